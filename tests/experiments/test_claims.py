"""The claim scripts: their report code on fabricated sweeps (fast), and LocalModelEval in a real 2-worker run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.claims import equivalence, exploration
from experiments.claims.common import expected_jobs, job_overrides, read_curves

REPO = Path(__file__).resolve().parents[2]


def fake_job(job_dir: Path, strategy: str, config: dict, test_acc: float, local: list[float] | None = None,
             epochs: int = 3) -> None:
    job_dir.mkdir(parents=True)
    gossip = strategy == "GossipStrategy"
    metrics = {"test/acc": test_acc, "test/loss": 1 - test_acc, "val/acc_best": test_acc, "train/loss": 0.1}
    if gossip:
        metrics["gossip/consensus_distance"] = 0.01
    result = {"metrics": metrics, "strategy": strategy, "gossip": gossip, "world_size": 4, "global_step": 20 * epochs,
              "runtime_s": 10.0, "seed": 1, "config": config,
              "gossip_counters": {"messages_sent": 6} if gossip else None}
    (job_dir / "results.json").write_text(json.dumps(result))
    (job_dir / "csv").mkdir()
    cols = ["epoch", "step", "val/acc", "val/loss", "train/loss", "gossip/consensus_distance", "local/acc_rank0",
            "local/acc_rank1"]
    with open(job_dir / "csv" / "metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for e in range(epochs):
            w.writerow([e, 20 * e + 19, test_acc * (e + 1) / epochs, 1.0 / (e + 1), 0.5 / (e + 1), 0.1 / (e + 1),
                        0.5, 0.6])
            w.writerow([e, 20 * e + 19, "", "", "", "", "", ""])  # a step row without epoch metrics
    if local is not None:
        (job_dir / "local_models.json").write_text(json.dumps({"epochs": [], "local_test_acc": local}))


def cfg(split="iid", batch=16, p=None, topology="random"):
    c = {"data": {"batch_size": batch, "split": split}}
    if p is not None:
        c["strategy"] = {"p": p, "topology": topology}
    return c


def test_expected_jobs_and_curves(tmp_path):
    assert expected_jobs(["experiment=x", "seed=1,2", "strategy.p=0,0.1,1", "hydra.sweep.dir=a,b"]) == 6
    # Hydra's order: a product with the first override outermost
    assert job_overrides(["e=x", "seed=1,2", "p=0,1"]) == [["e=x", "seed=1", "p=0"], ["e=x", "seed=1", "p=1"],
                                                           ["e=x", "seed=2", "p=0"], ["e=x", "seed=2", "p=1"]]
    fake_job(tmp_path / "0", "GossipStrategy", cfg(p=0.1), 0.9)
    curves = read_curves(tmp_path / "0")
    assert curves["val/acc"] == pytest.approx({0: 0.3, 1: 0.6, 2: 0.9})


def test_equivalence_report(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    for i, (p, acc) in enumerate([(0.0, 0.90), (0.0, 0.92), (0.1, 0.95), (0.1, 0.96)]):
        fake_job(runs / "gossip" / str(i), "GossipStrategy", cfg(p=p), acc)
    fake_job(runs / "ddp" / "0", "DDPStrategy", cfg(), 0.97)
    fake_job(runs / "single" / "0", "SingleDeviceStrategy", cfg(batch=64), 0.96)
    equivalence.report(runs, out)
    assert {p.name for p in out.iterdir()} >= {"curves.png", "accuracy_vs_p.png", "table.md", "table.csv"}
    table = (out / "table.md").read_text()
    assert "| gossip 4x16, p=0.1 | 2 |" in table and "0.955 ± 0.007" in table
    assert "| 1 worker, batch 64 | 1 |" in table and "| DDP 4x16 | 1 |" in table


def test_exploration_report(tmp_path):
    runs, out = tmp_path / "runs", tmp_path / "out"
    out.mkdir()
    n = 0
    for split in ("iid", "label_skew"):
        for p in (0.0, 0.1):
            fake_job(runs / "random" / str(n), "GossipStrategy", cfg(split, p=p), 0.9, local=[0.8, 0.7, 0.85, 0.75])
            n += 1
        fake_job(runs / "topology" / str(n), "GossipStrategy", cfg(split, p=0.1, topology="ring"), 0.88,
                 local=[0.8, 0.8, 0.8, 0.8])
        fake_job(runs / "ddp" / str(n), "DDPStrategy", cfg(split), 0.95)
        n += 1
    exploration.report(runs, out)
    assert {p.name for p in out.iterdir()} >= {"local_vs_consensus.png", "consensus_distance.png",
                                               "accuracy_vs_p.png", "table.md", "table.csv"}
    table = (out / "table.md").read_text()
    # consensus 0.9 vs own models' mean 0.775
    assert "| iid | gossip random | 0.1 | 1 | 0.900 | 0.775 ± 0.065 | 0.700 | 0.850 | +0.125 |" in table
    assert "| label_skew | DDP |  | 1 | 0.950 |" in table


@pytest.mark.slow
def test_local_model_eval_in_a_real_run(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_gossip.train", "experiment=claims_exploration", "trainer=debug",
         "trainer.max_epochs=1",  # the preset sets 20 epochs after the trainer group
         "trainer.limit_val_batches=null", "data.split=label_skew", "strategy.p=0.5", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-5000:]
    local = json.loads((run_dir / "local_models.json").read_text())
    assert len(local["local_test_acc"]) == 2 and len(local["epochs"]) == 1
    assert local["local_test_acc"][0] != local["local_test_acc"][1]  # skewed shards: the two workers differ
    curves = read_curves(run_dir)
    assert {"local/acc_rank0", "local/acc_rank1", "local/acc_mean", "val/acc"} <= set(curves)
