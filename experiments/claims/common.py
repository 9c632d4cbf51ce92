"""Shared helpers for the claim scripts: run a Hydra multirun of the entry point, read its jobs' curves."""

from __future__ import annotations

import csv
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


def expected_jobs(overrides: Sequence[str]) -> int:
    n = 1
    for o in overrides:
        if "=" in o and not o.startswith("hydra."):
            n *= len(o.split("=", 1)[1].split(","))
    return n


def run_sweep(name: str, overrides: Sequence[str], root: Path, log: Path, force: bool = False) -> Path:
    """Run ``python -m lightning_gossip.train -m <overrides>`` into ``root/name`` unless it finished before."""
    sweep_dir = root / name
    done = len(list(sweep_dir.glob("*/results.json")))
    cmd = train_command(overrides, sweep_dir)
    with open(log, "a") as f:
        f.write(f"{shell(cmd)}\n")
    if done >= expected_jobs(overrides) and not force:
        print(f"[{name}] {done} jobs already finished in {sweep_dir}; skipping (--force to rerun)", flush=True)
        return sweep_dir
    print(f"[{name}] running {expected_jobs(overrides)} job(s): {shell(cmd)}", flush=True)
    start = time.time()
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    sweep_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(sweep_dir.parent / f"{name}.out", "w") as out:  # the jobs' console output, kept out of the way
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"sweep {name} failed (exit {proc.returncode}); see {sweep_dir.parent / (name + '.out')}")
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
