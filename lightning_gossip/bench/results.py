"""From the workers' records to one table: rows, ratios to DDP, the comparison with a baseline, and the files.

Definitions (also written into results.md):

- *step time*: for every rank, the median of its step-to-step times on the training clock (wall-clock time with
  validation and the benchmark's own checks taken out), after the warm-up steps; then the mean over ranks. In the
  asynchronous rows ranks take different numbers of steps, each at its own pace;
- *vs DDP*: the row's step time divided by the DDP row's, measured in the same invocation on the same scenario;
- *bytes/step*: what one rank sends per step, mean over ranks: gossip's own counters (whole messages), plus what
  they do not count, computed (DDP: a ring all-reduce of the gradients, 2 (M-1)/M x their bytes; Local SGD: the
  float64 all-reduce of the exact average every H steps); *wire bytes/step*: what each worker's network interface
  really sent (TCP/IP included), in network namespaces only;
- *active step time*: the same medians with each rank's own wait for a CPU taken out (Linux schedstat: time the
  training thread was runnable but not running), so it counts computing and waiting for peers or sleeping, not the
  other jobs of a shared machine; *active_step_vs_ddp_cpu*: the row's active step time over the DDP row's CPU time
  per step (all threads of the process, validation left out), the step-time ratio ``--compare`` checks;
- *samples/s*: all ranks together, on the training clock, after the warm-up;
- *time to target*: the training clock at the first validation whose metric (mean over ranks) reaches the target;
  validation runs at the end of every epoch (and every ``--val-every`` steps in the lock-step rows);
- *final*: the metric of the last validation, at the end of training (mean over ranks: with gossip every rank
  validates the exact consensus model on its shard of the validation data);
- *repeats*: each strategy runs ``--repeats`` times, interleaved with the others; the repeat with the shortest step
  time is reported (noise on a shared machine only ever adds time), all are kept in the JSON.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import statistics
import time
from typing import Any, Callable, Optional

SCHEMA = "lightning-gossip-bench/1"
REFERENCE = "ddp"
# Settings that define the workload: a baseline recorded with other values cannot be compared ratio for ratio.
WORKLOAD_KEYS = ("model", "datamodule", "workers", "budget", "strategy_args", "scenarios", "metric", "mode",
                 "trainer_args", "accelerator", "seed")


# -- where and when -----------------------------------------------------------------------------------------------
def machine_stamp() -> dict[str, Any]:
    """Where and when the numbers were taken: printed on every table and plot."""
    from importlib import metadata

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = float("nan")
    versions = {}
    for package in ("torch", "lightning", "pytorch-lightning", "lightning-gossip"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return {
        "cpu_model": cpu,
        "nproc": os.cpu_count(),
        "torch": versions.get("torch", "unknown"),
        "versions": versions,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "loadavg_1min_at_start": round(load, 2),
    }


def stamp_line(stamp: dict[str, Any]) -> str:
    return f"{stamp['cpu_model']} x{stamp['nproc']} cores · torch {stamp['torch']} · {stamp['date']}"


def dump_json(obj: Any, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=float)
    os.replace(tmp, path)


# -- rows ---------------------------------------------------------------------------------------------------------
def _mean(values: list[float]) -> Optional[float]:
    return statistics.mean(values) if values else None


def summarize_run(recs: list[dict], warmup: int, uncounted: Callable[[dict, int, dict], float], args: dict) -> dict:
    """One run (one strategy, one repeat) from its ranks' records."""
    world = len(recs)
    medians, active_medians, rates, notes = [], [], [], []
    for r in recs:
        ends = r["ends"]
        n = len(ends)
        w = min(warmup, max(n - 3, 0))
        if w < warmup:
            notes.append(f"rank {r['rank']}: {n} steps, warm-up cut to {w}")
        # the times of steps w, w+1, ... (step i ends at ends[i]; the first step starts at 0 on the clock)
        previous = ends[w - 1 : -1] if w else [0.0, *ends[:-1]]
        diffs = [b - a for a, b in zip(previous, ends[w:])]
        if diffs:
            medians.append(statistics.median(diffs))
        waits = r.get("waits") or []
        if len(waits) == n:
            # the same steps with this rank's own runqueue wait taken out (see worker._runqueue_wait)
            previous_wait = waits[w - 1 : -1] if w else [0.0, *waits[:-1]]
            active = [d - (b - a) for d, a, b in zip(diffs, previous_wait, waits[w:])]
            if active:
                active_medians.append(statistics.median(active))
        start = ends[w - 1] if w else 0.0
        if n > w and ends[-1] > start:
            rates.append((n - w) * (r["samples"] / n) / (ends[-1] - start))
    steps = [r["steps"] for r in recs]
    counted = [(r["counters"] or {}).get("bytes_sent", 0) / max(r["batches"], 1) for r in recs]
    extra = uncounted(recs[0]["sizes"], world, args) if recs[0].get("sizes") else 0.0
    wire = [r["tx_bytes"] / max(r["batches"], 1) for r in recs if r.get("tx_bytes") is not None]
    evals = _merge_evals([r["evals"] for r in recs])
    finals = [r["final_eval"] for r in recs if r.get("final_eval") and r["final_eval"][2] is not None]
    final = statistics.mean(f[2] for f in finals) if len(finals) == world else None
    return {
        "step_ms": 1e3 * statistics.mean(medians) if medians else None,
        "per_rank_step_ms": [round(1e3 * m, 4) for m in medians],
        "active_step_ms": 1e3 * statistics.mean(active_medians) if len(active_medians) == world else None,
        "samples_per_s": sum(rates) if len(rates) == world else None,
        "steps": statistics.mean(steps),
        "per_rank_steps": steps,
        "samples": sum(r["samples"] for r in recs),
        "train_s": max(r["train_end"] or 0.0 for r in recs),
        "bytes_per_step": statistics.mean(counted) + extra,
        "counted_bytes_per_step": statistics.mean(counted),
        "computed_bytes_per_step": extra,
        "wire_bytes_per_step": _mean(wire) if len(wire) == world else None,
        "message_bytes": recs[0].get("message_bytes"),
        "messages_per_step": statistics.mean((r["counters"] or {}).get("messages_sent", 0) / max(r["batches"], 1)
                                             for r in recs),
        "cpu_ms_per_step": 1e3 * statistics.mean(r["cpu_s"] / max(r["batches"], 1) for r in recs),
        "straggler_sleep_ms": 1e3 * max(r.get("sleep_s", 0.0) for r in recs),
        "evals": evals,
        "final_metric": final,
        "notes": notes,
    }


def _merge_evals(per_rank: list[list[list[Any]]]) -> list[list[Any]]:
    """Validation n of every rank -> [training clock (latest rank), step (mean), metric (mean over ranks)]."""
    count = min((len(e) for e in per_rank), default=0)
    out = []
    for i in range(count):
        points = [e[i] for e in per_rank]
        values = [p[2] for p in points]
        value = statistics.mean(values) if all(v is not None for v in values) else None
        out.append([round(max(p[0] for p in points), 4), statistics.mean(p[1] for p in points),
                    None if value is None else round(value, 6)])
    return out


def parse_target(target: Any) -> tuple[Optional[float], Optional[float]]:
    """``--target``: a number (absolute), or ``ddp`` / ``ddp-0.01`` (DDP's final metric, or that much worse).
    Returns (absolute, slack): one of them is None."""
    if target is None:
        return None, None
    if isinstance(target, (int, float)) and not isinstance(target, bool):
        return float(target), None
    text = str(target).strip()
    if text.startswith("ddp"):
        rest = text[3:].strip()
        if not rest:
            return None, 0.0
        if rest.startswith("-"):
            try:
                return None, float(rest[1:])
            except ValueError:
                pass
        raise ValueError(f"--target {target!r}: expected a number, 'ddp' or 'ddp-X' (X worse than DDP's final "
                         "metric, e.g. ddp-0.01)")
    try:
        return float(text), None
    except ValueError:
        raise ValueError(f"--target {target!r}: expected a number, 'ddp' or 'ddp-X' (e.g. 0.9, ddp, ddp-0.01)") \
            from None


def reached(value: Optional[float], target: float, mode: str) -> bool:
    return value is not None and (value >= target if mode == "max" else value <= target)


RATIO_NAMES = ("step_vs_ddp", "active_step_vs_ddp_cpu", "throughput_vs_ddp", "bytes_vs_ddp", "tta_vs_ddp")


def finish_rows(rows: list[dict], settings: dict) -> None:
    """Targets and times to target, and the ratios to the DDP row of each scenario, in place."""
    absolute, slack = parse_target(settings.get("target"))
    mode = settings.get("mode", "max")
    by_scenario: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_scenario.setdefault(r["scenario"], {})[r["strategy"]] = r
    for scenario, named in by_scenario.items():
        ddp = named.get(REFERENCE)
        ddp_ok = ddp is not None and ddp["status"] == "ok"
        target = absolute
        if slack is not None and ddp_ok and ddp.get("final_metric") is not None:
            target = ddp["final_metric"] - slack if mode == "max" else ddp["final_metric"] + slack
        for r in named.values():
            r["target"] = None if target is None else round(target, 6)
            r["time_to_target_s"] = None
            if r["status"] == "ok" and target is not None:
                r["time_to_target_s"] = next((t for t, _, v in r["evals"] if reached(v, target, mode)), None)
        for r in named.values():
            for name in RATIO_NAMES:
                r[name] = None
            if r["status"] != "ok" or not ddp_ok:
                continue
            if r.get("step_ms") and ddp.get("step_ms"):
                r["step_vs_ddp"] = r["step_ms"] / ddp["step_ms"]
            if r.get("active_step_ms") and ddp.get("cpu_ms_per_step"):
                # what the comparison checks: see compare()
                r["active_step_vs_ddp_cpu"] = r["active_step_ms"] / ddp["cpu_ms_per_step"]
            if r.get("samples_per_s") and ddp.get("samples_per_s"):
                r["throughput_vs_ddp"] = r["samples_per_s"] / ddp["samples_per_s"]
            if ddp.get("bytes_per_step"):
                r["bytes_vs_ddp"] = r["bytes_per_step"] / ddp["bytes_per_step"]
            if r.get("time_to_target_s") is not None and ddp.get("time_to_target_s"):
                r["tta_vs_ddp"] = r["time_to_target_s"] / ddp["time_to_target_s"]


def ratios(rows: list[dict]) -> dict[str, float]:
    """``scenario/strategy/ratio`` -> value, for every ratio measured (the DDP rows are the references)."""
    out = {}
    for r in rows:
        if r["strategy"] == REFERENCE or r["status"] != "ok":
            continue
        for name in RATIO_NAMES:
            if r.get(name) is not None:
                out[f"{r['scenario']}/{r['strategy']}/{name}"] = round(r[name], 4)
    return dict(sorted(out.items()))


# -- comparing with a baseline ------------------------------------------------------------------------------------
def compare(results: dict, baseline: dict, tolerance: float, metric_tolerance: float,
            bytes_tolerance: float, min_change: float = 0.5) -> tuple[list[str], list[str]]:
    """Regressions of ``results`` against ``baseline`` -> (problems, report lines). Ratios only, never seconds.

    - the step time relative to DDP: a regression when the ratio grows by more than ``tolerance`` (0.5: more than
      1.5x the baseline's) *and* by more than ``min_change`` (0.5, in units of the denominator), so the jitter of
      a row much faster than DDP is not one. Both are measured in the same run, so a slower machine moves both.
      Checked on ``active_step_vs_ddp_cpu`` where both runs measured it: the row's *active* step time (wall-clock
      minus each rank's own wait for a CPU, so other jobs on a shared machine move it far less, while a sleep or a
      wait for a peer stays in) over DDP's *CPU* time per step (which the load barely moves, unlike DDP's wall or
      active time: DDP waits for its slowest peer at every step). Elsewhere (no Linux schedstat), on
      ``step_vs_ddp``, wall-clock over wall-clock;
    - ``bytes_vs_ddp``: when it grows by more than ``bytes_tolerance`` (relative; 0.25: exact in the lock-step rows,
      whose schedule is seeded, but an asynchronous rank skips a push while its previous one is untaken, so its
      bytes move by about 10% between runs);
    - the final metric of every row: when it is worse than the baseline's by more than ``metric_tolerance``
      (relative to the baseline's value); a row that reached the target in the baseline and does not now;
    - a row of the baseline that is missing or failed now; settings that define a different workload.
    The other ratios (wall-clock ``step_vs_ddp`` where the active one is checked, ``throughput_vs_ddp``,
    ``tta_vs_ddp``) are printed beside them, for information (``tta`` moves in steps of whole validation intervals).
    """
    problems: list[str] = []
    lines = []
    settings, base_settings = results.get("settings", {}), baseline.get("settings", {})
    differ = [k for k in WORKLOAD_KEYS if k in base_settings and settings.get(k) != base_settings.get(k)]
    for key in differ:
        problems.append(f"settings: {key} is {settings.get(key)!r} here but {base_settings.get(key)!r} in the "
                        "baseline (a different workload: regenerate the baseline)")
    mode = settings.get("mode", base_settings.get("mode", "max"))
    lines.append(f"{'row':34s} {'ratio':22s} {'baseline':>9s} {'now':>9s} {'change':>8s}  verdict")
    cur, base = results.get("ratios", {}), baseline.get("ratios", {})

    def timing_ratio(row: str) -> str:
        """The timing checked: the active step ratio where both runs measured it, else the wall-clock one."""
        active = f"{row}/active_step_vs_ddp_cpu"
        return "active_step_vs_ddp_cpu" if active in base and active in cur else "step_vs_ddp"

    for key in sorted(base):
        row, _, name = key.rpartition("/")
        b, c = base[key], cur.get(key)
        if c is None:
            verdict = "missing now"
            if name in ("step_vs_ddp", "bytes_vs_ddp"):
                problems.append(f"{row}: {name} measured in the baseline ({b:.3f}) but not now")
                verdict = "REGRESSION (missing)"
            lines.append(f"{row:34s} {name:22s} {b:9.3f} {'-':>9s} {'':>8s}  {verdict}")
            continue
        change = c / b if b else float("inf") if c else 1.0
        verdict = "ok"
        if name == timing_ratio(row) and c > b * (1 + tolerance) and c - b > min_change:
            verdict = "REGRESSION"
            problems.append(f"{row}: {name} {b:.3f} -> {c:.3f} (x{change:.2f}, +{c - b:.2f}; allowed up to "
                            f"x{1 + tolerance:.2f} or +{min_change:.2f})")
        elif name == "bytes_vs_ddp" and c > b * (1 + bytes_tolerance) + 1e-12:
            verdict = "REGRESSION"
            problems.append(f"{row}: bytes_vs_ddp {b:.4f} -> {c:.4f} (x{change:.3f}; allowed up to "
                            f"x{1 + bytes_tolerance:.2f})")
        elif name != "bytes_vs_ddp" and name != timing_ratio(row):
            worse = c < b / (1 + tolerance) if name == "throughput_vs_ddp" else c > b * (1 + tolerance)
            verdict = "info (worse)" if worse else "info"
        lines.append(f"{row:34s} {name:22s} {b:9.3f} {c:9.3f} {change:7.2f}x  {verdict}")
    rows = {(r["scenario"], r["strategy"]): r for r in results.get("rows", [])}
    for brow in baseline.get("rows", []):
        key = (brow["scenario"], brow["strategy"])
        name = "/".join(key)
        if brow.get("status") != "ok":
            continue
        row = rows.get(key)
        if row is None or row.get("status") != "ok":
            problems.append(f"{name}: {'missing' if row is None else row.get('status')} now (ok in the baseline)")
            continue
        b, c = brow.get("final_metric"), row.get("final_metric")
        if b is not None:
            allowed = metric_tolerance * max(abs(b), 1e-12)
            worse = c is None or (c < b - allowed if mode == "max" else c > b + allowed)
            verdict = "REGRESSION" if worse else "ok"
            if worse:
                problems.append(f"{name}: final {settings.get('metric')} {b:.4f} -> "
                                f"{'none' if c is None else f'{c:.4f}'} (worse by more than "
                                f"{100 * metric_tolerance:g}% of the baseline)")
            lines.append(f"{name:34s} {'final metric':22s} {b:9.4f} {'-' if c is None else f'{c:9.4f}':>9s} "
                         f"{'':>8s}  {verdict}")
        if brow.get("time_to_target_s") is not None and row.get("time_to_target_s") is None \
                and row.get("target") is not None:
            problems.append(f"{name}: reached the target {row['target']:g} in the baseline, not now")
    return problems, lines


# -- the table ----------------------------------------------------------------------------------------------------
def fmt_bytes(b: Optional[float]) -> str:
    if b is None:
        return "-"
    if b >= 1e9:
        return f"{b / 1e9:.2f} GB"
    if b >= 1e6:
        return f"{b / 1e6:.2f} MB"
    if b >= 1e3:
        return f"{b / 1e3:.1f} kB"
    return f"{b:.0f} B"


def _f(x: Optional[float], spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results: dict) -> list[list[str]]:
    """The one table: a header and one line per row."""
    metric = results["settings"].get("metric") or "metric"
    target = next((r.get("target") for r in results["rows"] if r.get("target") is not None), None)
    header = ["scenario", "strategy", "step ms", "vs DDP", "bytes/step", "samples/s",
              f"time to {metric}" + (f" {target:g}" if target is not None else "") + " (s)", f"final {metric}"]
    lines = [header]
    for r in results["rows"]:
        if r["status"] != "ok":
            lines.append([r["scenario"], r["strategy"], r["status"], "", "", "", "", ""])
            continue
        tta = r.get("time_to_target_s")
        lines.append([
            r["scenario"], r["strategy"], _f(r.get("step_ms"), ".2f"),
            "1 (ref)" if r["strategy"] == REFERENCE else _f(r.get("step_vs_ddp"), ".2f"),
            fmt_bytes(r.get("bytes_per_step")), _f(r.get("samples_per_s"), ".0f"),
            ("not reached" if r.get("target") is not None else "-") if tta is None else f"{tta:.2f}",
            _f(r.get("final_metric"), ".4f"),
        ])
    return lines


def render_text(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for n, line in enumerate(lines):
        cells = (cell.rjust(w) if i >= 2 else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths)))
        out.append("  ".join(cells))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def render_markdown(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


# -- files --------------------------------------------------------------------------------------------------------
CSV_COLUMNS = ("scenario", "strategy", "status", "step_ms", "step_vs_ddp", "bytes_per_step", "bytes_vs_ddp",
               "samples_per_s", "throughput_vs_ddp", "time_to_target_s", "tta_vs_ddp", "target", "final_metric",
               "steps", "samples", "train_s", "wire_bytes_per_step", "cpu_ms_per_step", "messages_per_step")


def write_csv(results: dict, path: str) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results["rows"]:
            writer.writerow({k: r.get(k) for k in CSV_COLUMNS})


def write_markdown(results: dict, path: str, comparison: Optional[list[str]] = None) -> None:
    st, se = results["machine"], results["settings"]
    budget = se["budget"]
    lines = [
        "# lightning-gossip benchmark",
        "",
        f"Command: `{results.get('command', '')}`",
        "",
        f"Machine: {st['cpu_model']}, {st['nproc']} cores, torch {st['torch']}, python {st['python']}, {st['date']}; "
        f"load average at start {st['loadavg_1min_at_start']}.",
        "",
        f"Model: `{se['model_description']}`" + (f"; datamodule: `{se['datamodule_description']}`"
                                                 if se.get("datamodule_description") else "") + ".",
        f"{se['workers']} workers ({se['accelerator']}, {se['threads']} thread(s) each), {budget['value']:g} "
        f"{budget['kind']} per run, {se['repeats']} repeat(s) (the fastest kept), {se['warmup']} warm-up steps; "
        f"metric {se.get('metric') or '-'} ({se.get('mode')}), target {se.get('target')}.",
        "",
        "Ratios to DDP are measured in the same run on the same machine; absolute times depend on the machine and "
        "its load.",
        "",
    ]
    for note in results.get("notes", []):
        lines.append(f"- note: {note}")
    if results.get("notes"):
        lines.append("")
    lines += ["| scenario | network | straggler | wall |", "|---|---|---|---|"]
    for s in results["scenarios"]:
        net = "loopback" if s["network"] == "loopback" else \
            f"namespaces, {s['rate_mbit']:g} Mbit/s" if s.get("rate_mbit") else "namespaces, no limit"
        if s.get("measured_mbit"):
            net += f" (measured {s['measured_mbit']} Mbit/s)"
        strag = f"rank {s['straggler']['rank']} x{s['straggler']['factor']:g}" if s.get("straggler") else "-"
        lines.append(f"| {s['name']} | {net} | {strag} | {s.get('wall_s', '-')} s |")
    lines += ["", "## Results", "", render_markdown(table(results)), ""]
    ratio_rows = [r for r in results["rows"] if r["status"] == "ok" and r["strategy"] != REFERENCE]
    if ratio_rows:
        lines += ["Ratios to the DDP row of the same scenario (`--compare` checks `active_step_vs_ddp_cpu`, bytes and "
                  "the final metric; see the definitions):", "",
                  "| scenario | strategy | " + " | ".join(RATIO_NAMES) + " |", "|---|---|" + "---|" * len(RATIO_NAMES)]
        for r in ratio_rows:
            lines.append(f"| {r['scenario']} | {r['strategy']} | "
                         + " | ".join(_f(r.get(name), ".3f") for name in RATIO_NAMES) + " |")
        lines.append("")
    if comparison:
        lines += ["## Comparison with the baseline", "", "```", *comparison, "```", ""]
    lines += ["## Definitions", "", __doc__.split("Definitions (also written into results.md):", 1)[1].strip(), ""]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def write_plots(results: dict, out_dir: str) -> tuple[list[str], Optional[str]]:
    """Plots if matplotlib is installed: (files written, or a note saying why none were)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install 'lightning-gossip[plots]')"
    written = []
    stamp = stamp_line(results["machine"])
    metric = results["settings"].get("metric")

    def finish(fig: Any, name: str) -> None:
        fig.text(0.01, 0.005, stamp, fontsize=7, color="gray", ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    scenarios = [s["name"] for s in results["scenarios"]]
    ok = [r for r in results["rows"] if r["status"] == "ok"]
    if metric:
        for sc in scenarios:
            fig, ax = plt.subplots(figsize=(7.5, 4.5))
            for r in (r for r in ok if r["scenario"] == sc):
                pts = [(t, v) for t, _, v in r["evals"] if v is not None]
                if pts:
                    ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=r["strategy"])
            target = next((r.get("target") for r in ok if r["scenario"] == sc and r.get("target") is not None), None)
            if target is not None:
                ax.axhline(target, color="gray", ls=":", lw=1, label="target")
            if not ax.lines:
                plt.close(fig)
                continue
            ax.set_xlabel("training time (s, validation excluded)")
            ax.set_ylabel(metric)
            ax.set_title(f"{metric} against training time, {sc}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            finish(fig, f"{metric}_vs_time_{sc}.png")
    bars = [r for r in ok if r.get("step_vs_ddp") is not None or r["strategy"] == REFERENCE]
    if bars:
        fig, ax = plt.subplots(figsize=(7.5, 0.4 * len(bars) + 1.5))
        labels = [f"{r['scenario']} / {r['strategy']}" for r in bars]
        values = [1.0 if r["strategy"] == REFERENCE else r["step_vs_ddp"] for r in bars]
        ax.barh(range(len(bars)), values, color=["gray" if r["strategy"] == REFERENCE else "C0" for r in bars])
        ax.set_yticks(range(len(bars)), labels, fontsize=8)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.invert_yaxis()
        ax.set_xlabel("step time / DDP's step time (lower is faster)")
        ax.set_title("Step time relative to DDP", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        finish(fig, "step_vs_ddp.png")
    return written, None
