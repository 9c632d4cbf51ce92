"""Collect a Hydra multirun sweep into one table and one plot.

    python -m lightning_gossip.sweep logs/train/multiruns/<time>                 # x and groups chosen automatically
    python -m lightning_gossip.sweep <dir> --x strategy.p --y test/acc --out results/

Every job of ``python -m lightning_gossip.train -m ...`` writes ``results.json`` (final metrics, its overrides, the
gossip counters) into its own folder. This reads them all and writes, into ``--out`` (default: the sweep folder):

- ``sweep.csv``: one row per job: the job folder, every override, the metrics, runtime and bytes sent;
- ``sweep.md``: the same as a markdown table, plus a summary grouped by the overrides that vary (seeds pooled):
  mean, standard deviation and count of ``--y``;
- ``sweep.png``: ``--y`` against ``--x`` (mean over seeds, error bars one standard deviation), one line per value
  of the other varying overrides (needs matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from lightning_gossip.app.results import RESULTS_FILE

_OVERRIDES = "__overrides__"  # row key listing which keys came from overrides
SEED_KEYS = ("seed",)
DEFAULT_METRICS = ("test/acc", "test/loss", "val/acc", "val/acc_best", "val/loss", "train/acc", "train/loss",
                   "gossip/consensus_distance")


def _parse_value(text: str) -> Any:
    """Override values as numbers where they are numbers (so ``p=0.1`` sorts and plots as 0.1)."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False, "null": None}.get(text.lower(), text)


def parse_override(override: str) -> tuple[str, Any]:
    """``'strategy.p=0.1'`` -> ``('strategy.p', 0.1)``; ``'+a=b'``/``'++a=b'``/``'~a'`` keep the bare key."""
    key, _, value = override.partition("=")
    return key.lstrip("+~"), _parse_value(value)


def load_results(sweep_dir: Path) -> list[dict[str, Any]]:
    """One flat row per job (``results.json`` found anywhere below ``sweep_dir``), ordered by job folder."""
    files = sorted(Path(sweep_dir).rglob(RESULTS_FILE), key=lambda p: [_natural(s) for s in p.parent.parts])
    rows = []
    for file in files:
        result = json.loads(file.read_text())
        row: dict[str, Any] = {"job": str(file.parent.relative_to(sweep_dir)) or "."}
        keys = []
        for override in result.get("overrides", []):
            key, value = parse_override(override)
            row[key] = value
            keys.append(key)
        if "seed" not in row:
            row["seed"] = result.get("seed")
            keys.append("seed")
        row[_OVERRIDES] = tuple(keys)
        for key, value in result.get("metrics", {}).items():
            row[key] = value
        row["runtime_s"] = result.get("runtime_s")
        row["world_size"] = result.get("world_size")
        row["global_step"] = result.get("global_step")
        row["strategy"] = result.get("strategy")
        counters = result.get("gossip_counters") or {}
        if counters:
            row["bytes_sent_rank0"] = counters.get("bytes_sent")
            row["messages_sent_rank0"] = counters.get("messages_sent")
        rows.append(row)
    return rows


def _natural(text: str) -> tuple[int, Any]:
    return (0, int(text)) if text.isdigit() else (1, text)


def override_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The override keys (and the seed) in the order they first appear."""
    keys: list[str] = []
    for row in rows:
        for key in row.get(_OVERRIDES, ()):
            if key not in keys:
                keys.append(key)
    return keys


def varying_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Override keys whose value differs between jobs."""
    return [k for k in override_keys(rows) if len({repr(r.get(k)) for r in rows}) > 1]


def columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    cols = ["job"] + override_keys(rows)
    for row in rows:
        for key in row:
            if key not in cols and key != _OVERRIDES:
                cols.append(key)
    return cols


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
    return str(value)


def summarize(rows: Sequence[dict[str, Any]], y: str, group_by: Sequence[str]) -> list[dict[str, Any]]:
    """Mean/std/count of ``y`` per combination of ``group_by`` values (seeds pooled), in first-seen order."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        key = tuple(row.get(k) for k in group_by)
        value = row.get(y)
        groups.setdefault(key, [])
        if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isnan(value)):
            groups[key].append(float(value))
    out = []
    for key, values in groups.items():
        entry = dict(zip(group_by, key))
        entry.update({
            f"{y} mean": statistics.fmean(values) if values else None,
            f"{y} std": statistics.stdev(values) if len(values) > 1 else (0.0 if values else None),
            "n": len(values),
        })
        out.append(entry)
    return out


def markdown_table(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) for c in cols) + " |")
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], path: Path) -> None:
    cols = columns(rows)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in cols})


def choose_x(rows: Sequence[dict[str, Any]], x: Optional[str]) -> Optional[str]:
    """The requested x, else the first varying numeric override that is not a seed, else the first varying one."""
    if x:
        return x
    candidates = [k for k in varying_keys(rows) if k not in SEED_KEYS]
    numeric = [k for k in candidates if all(isinstance(r.get(k), (int, float)) for r in rows)]
    return (numeric or candidates or [None])[0]


def plot(rows: Sequence[dict[str, Any]], x: str, y: str, hue: Sequence[str], path: Path, title: str = "") -> bool:
    """y against x, mean +- std over the other (seed) repetitions, one line per hue combination."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    numeric_x = all(isinstance(r.get(x), (int, float)) and not isinstance(r.get(x), bool) for r in rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    lines = summarize(rows, y, list(hue) + [x])
    by_hue: dict[tuple, list[dict[str, Any]]] = {}
    for entry in lines:
        by_hue.setdefault(tuple(entry[h] for h in hue), []).append(entry)
    xs_all = sorted({e[x] for e in lines}, key=lambda v: (str(type(v)), v)) if not numeric_x else None
    for key, entries in by_hue.items():
        entries = [e for e in entries if e[f"{y} mean"] is not None]
        if not entries:
            continue
        entries.sort(key=lambda e: e[x] if numeric_x else xs_all.index(e[x]))
        xs = [e[x] if numeric_x else xs_all.index(e[x]) for e in entries]
        label = ", ".join(f"{h}={v}" for h, v in zip(hue, key)) or y
        ax.errorbar(xs, [e[f"{y} mean"] for e in entries], yerr=[e[f"{y} std"] or 0.0 for e in entries],
                    marker="o", capsize=3, label=label)
    if numeric_x:
        positive = sorted({float(r[x]) for r in rows if r[x] > 0})
        if positive and positive[-1] / positive[0] >= 20:  # e.g. p = 0, 0.01, 0.1, 1: spread the small values
            ax.set_xscale("symlog", linthresh=positive[0])
            ax.set_xticks(sorted({float(r[x]) for r in rows}))
            ax.set_xticklabels([f"{v:g}" for v in sorted({float(r[x]) for r in rows})])
    else:
        ax.set_xticks(range(len(xs_all)))
        ax.set_xticklabels([str(v) for v in xs_all], rotation=20)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    n = max((e["n"] for e in lines), default=0)
    ax.set_title(title or f"{y} vs {x} (mean ± std over {n} run(s) each)")
    ax.grid(alpha=0.3)
    if hue:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def collect(sweep_dir: Path, out: Optional[Path] = None, x: Optional[str] = None, y: str = "test/acc",
            hue: Optional[Iterable[str]] = None) -> dict[str, Path]:
    """Write sweep.csv, sweep.md and sweep.png for a multirun folder; return their paths."""
    sweep_dir = Path(sweep_dir)
    rows = load_results(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"No {RESULTS_FILE} below {sweep_dir}: is it a multirun folder of "
                                "`python -m lightning_gossip.train -m ...` whose jobs finished?")
    out = Path(out) if out else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "sweep.csv", "md": out / "sweep.md"}
    write_csv(rows, written["csv"])

    vary = varying_keys(rows)
    group_by = [k for k in vary if k not in SEED_KEYS]
    x = choose_x(rows, x)
    hue = list(hue) if hue is not None else [k for k in group_by if k != x]
    shown = ["job"] + vary + [m for m in DEFAULT_METRICS if any(m in r for r in rows)] + \
        [c for c in ("runtime_s", "bytes_sent_rank0") if any(c in r for r in rows)]
    text = [f"# Sweep: {sweep_dir}", "", f"{len(rows)} job(s). Varying: {', '.join(vary) or 'nothing'}.", ""]
    if group_by:
        text += [f"## {y} by {', '.join(group_by)} (seeds pooled)", "",
                 markdown_table(summarize(rows, y, group_by), group_by + [f"{y} mean", f"{y} std", "n"]), ""]
    text += ["## Jobs", "", markdown_table(rows, shown), ""]
    written["md"].write_text("\n".join(text))
    if x is not None and plot(rows, x, y, hue, out / "sweep.png"):
        written["png"] = out / "sweep.png"
    return written


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lightning_gossip.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", type=Path, help="the multirun folder (logs/<task>/multiruns/<time>)")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    parser.add_argument("--x", default=None, help="override on the x axis (default: first varying numeric one)")
    parser.add_argument("--y", default="test/acc", help="metric on the y axis and in the summary")
    parser.add_argument("--hue", nargs="*", default=None,
                        help="overrides that make separate lines (default: the other varying ones but seed)")
    args = parser.parse_args(argv)
    written = collect(args.sweep_dir, args.out, args.x, args.y, args.hue)
    print(written["md"].read_text())
    for kind, path in written.items():
        print(f"{kind}: {path}")


if __name__ == "__main__":
    main()
