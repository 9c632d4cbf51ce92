"""Shared helpers for the claim scripts: run a Hydra multirun of the entry point, read its jobs' curves."""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

REPO = Path(__file__).resolve().parents[2]


def train_command(overrides: Sequence[str], sweep_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lightning_gossip.train", "-m", *overrides, f"hydra.sweep.dir={sweep_dir}"]


def shell(cmd: Sequence[str]) -> str:
    """The command as one would type it (python -m ... with the interpreter shortened to `python`)."""
    return " ".join(["python"] + [shlex.quote(c.replace(f"{REPO}/", "")) for c in cmd[1:]])


def job_overrides(overrides: Sequence[str]) -> list[list[str]]:
    """The jobs of a multirun in Hydra's order (BasicSweeper: a product, the first override outermost)."""
    choices = []
    for o in overrides:
        key, _, value = o.partition("=")
        choices.append([f"{key}={v}" for v in value.split(",")] if "," in value and not o.startswith("hydra.") else [o])
    return [list(c) for c in itertools.product(*choices)]


def expected_jobs(overrides: Sequence[str]) -> int:
    return len(job_overrides(overrides))


def _run(cmd: Sequence[str], out_file: Path) -> int:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    with open(out_file, "a") as out:  # the jobs' console output, kept out of the way
        return subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode


def run_sweep(name: str, overrides: Sequence[str], root: Path, log: Path, force: bool = False) -> Path:
    """Run ``python -m lightning_gossip.train -m <overrides>`` into ``root/name``.

    Jobs that finished before (their ``results.json`` exists) are kept unless ``force``; if only some are missing,
    just those are run again, one by one, into the job folders the multirun would have used.
    """
    sweep_dir = root / name
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    out_file = sweep_dir.parent / f"{name}.out"
    cmd = train_command(overrides, sweep_dir)
    with open(log, "a") as f:
        f.write(f"{shell(cmd)}\n")
    all_jobs = job_overrides(overrides)
    missing = [i for i in range(len(all_jobs)) if force or not (sweep_dir / str(i) / "results.json").exists()]
    start = time.time()
    if not missing:
        print(f"[{name}] all {len(all_jobs)} jobs finished before in {sweep_dir}; skipping", flush=True)
        return sweep_dir
    if len(missing) == len(all_jobs):
        print(f"[{name}] running {len(all_jobs)} job(s): {shell(cmd)}", flush=True)
        code = _run(cmd, out_file)
    else:
        code = 0
        for i in missing:
            job_cmd = [sys.executable, "-m", "lightning_gossip.train", *all_jobs[i],
                       f"hydra.run.dir={sweep_dir / str(i)}"]
            print(f"[{name}] rerunning job {i}: {shell(job_cmd)}", flush=True)
            code = code or _run(job_cmd, out_file)
    still = [i for i in range(len(all_jobs)) if not (sweep_dir / str(i) / "results.json").exists()]
    if code != 0 or still:
        raise RuntimeError(f"sweep {name}: jobs {still} did not finish (exit {code}); see {out_file}. "
                           "Run the script again to rerun only those.")
    print(f"[{name}] done in {time.time() - start:.0f} s", flush=True)
    return sweep_dir


def jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each finished job: its results.json plus its per-epoch curves (from the CSV logger) and local_models.json."""
    out = []
    for file in sorted(sweep_dir.glob("*/results.json"), key=lambda p: int(p.parent.name)):
        result = json.loads(file.read_text())
        result["curves"] = read_curves(file.parent)
        local = file.parent / "local_models.json"
        result["local"] = json.loads(local.read_text()) if local.exists() else None
        out.append(result)
    return out


def read_curves(job_dir: Path) -> dict[str, dict[int, float]]:
    """metric -> {epoch: value} from csv/metrics.csv (the last value logged in each epoch)."""
    files = list(job_dir.glob("csv/**/metrics.csv"))
    curves: dict[str, dict[int, float]] = {}
    if not files:
        return curves
    with open(files[0]) as f:
        for row in csv.DictReader(f):
            epoch = int(row["epoch"]) if row.get("epoch") not in (None, "") else None
            if epoch is None:
                continue
            for key, value in row.items():
                if key in ("epoch", "step") or value in (None, ""):
                    continue
                curves.setdefault(key, {})[epoch] = float(value)
    return curves


def cfg_get(result: dict[str, Any], dotted: str) -> Any:
    node: Any = result["config"]
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def mean_std(values: Iterable[Optional[float]]) -> tuple[float, float, int]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan"), 0
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0), len(vals)


def mean_curve(results: Sequence[dict[str, Any]], metric: str) -> tuple[list[int], list[float], list[float]]:
    """Epochs, mean and std over runs of one metric's per-epoch curve (epochs every run has)."""
    curves = [r["curves"].get(metric, {}) for r in results]
    epochs = sorted(set.intersection(*(set(c) for c in curves))) if curves and all(curves) else []
    means, stds = [], []
    for e in epochs:
        m, s, _ = mean_std(c[e] for c in curves)
        means.append(m)
        stds.append(s)
    return epochs, means, stds


def fmt(mean: float, std: float, n: int, digits: int = 3) -> str:
    if n == 0 or math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if n == 1 else f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(rows: Sequence[dict[str, Any]], cols: Sequence[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(rows: Sequence[dict[str, Any]], cols: Sequence[str], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(cols), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
