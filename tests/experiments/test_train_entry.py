"""The entry point for real: `python -m lightning_gossip.train` with 2 CPU workers, a 2-job x 2-worker multirun
(the clash between Lightning's popen launcher and Hydra multirun), and the sweep collector on that sweep."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightning_gossip.app import sweep

REPO = Path(__file__).resolve().parents[2]
# tiny: 2 workers, 4 steps, 2 val/test batches, no progress-bar noise, 1 thread per worker
TINY = ["trainer=debug", "extras.print_config=false", "callbacks.progress_bar.refresh_rate=0",
        "strategy.timeout.seconds=60"]


def run_train(args: list[str], cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    env.pop("LIGHTNING_GOSSIP_WORKER_CONFIG", None)
    for key in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "RANK"):
        env.pop(key, None)  # a leftover would make Lightning believe the processes exist already
    return subprocess.run([sys.executable, "-m", "lightning_gossip.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
    )


def read_metrics_csv(run_dir: Path) -> list[dict[str, str]]:
    (path,) = run_dir.glob("csv/**/metrics.csv")
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_single_run_two_workers(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train([*TINY, "strategy.p=1.0", f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={run_dir}"],
                     cwd=tmp_path)
    check(proc)
    assert "Test accuracy of the consensus model (GossipStrategy, 2 worker(s))" in proc.stdout
    assert f"checkpoints: {run_dir}/checkpoints" in proc.stdout and "CSVLogger" in proc.stdout
    result = json.loads((run_dir / "results.json").read_text())
    assert result["world_size"] == 2 and result["gossip"] is True
    assert result["global_step"] == 4  # trainer=debug: limit_train_batches=4
    # p=1: rank 0 pushes after every one of its 4 steps
    assert result["gossip_counters"]["messages_sent"] == 4 and result["gossip_counters"]["bytes_sent"] > 0
    assert 0.0 <= result["metrics"]["test/acc"] <= 1.0
    assert "strategy.p=1.0" in result["overrides"] and not any(o.startswith("hydra.") for o in result["overrides"])
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    rows = read_metrics_csv(run_dir)
    columns = set(rows[0])
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "test/acc", "gossip/consensus_distance"} <= columns
    assert any(r["gossip/weight"] for r in rows)
    # the worker ran the resolved config of this run, and nothing was written outside the run folder
    worker_cfg = (run_dir / ".worker_config.yaml").read_text()
    assert "p: 1.0" in worker_cfg and str(run_dir) in worker_cfg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


@pytest.mark.slow
def test_multirun_two_jobs_two_workers_and_sweep_collector(tmp_path):
    sweep_dir = tmp_path / "sweep"
    proc = run_train(["-m", "strategy.p=0,1", *TINY, f"paths.log_dir={tmp_path / 'logs'}",
                      f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=400)
    check(proc)
    # Lightning's own launcher would re-run `-m strategy.p=0,1 ...` in every child: extra sweeps, extra folders.
    assert proc.stdout.count("Launching 2 jobs locally") + proc.stderr.count("Launching 2 jobs locally") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    results = [json.loads((sweep_dir / job / "results.json").read_text()) for job in ("0", "1")]
    for job, (result, p) in enumerate(zip(results, (0.0, 1.0))):
        assert f"strategy.p={p:g}" in result["overrides"]
        assert result["config"]["strategy"]["p"] == p
        assert result["output_dir"] == str(sweep_dir / str(job))
        assert result["world_size"] == 2 and result["global_step"] == 4
        assert (sweep_dir / str(job) / "checkpoints" / "last.ckpt").exists()
    assert results[0]["gossip_counters"]["bytes_sent"] == 0
    assert results[1]["gossip_counters"]["messages_sent"] == 4

    written = sweep.collect(sweep_dir)
    with open(written["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [float(r["strategy.p"]) for r in rows] == [0.0, 1.0]
    assert [float(r["test/acc"]) for r in rows] == pytest.approx([r["metrics"]["test/acc"] for r in results])
    assert [int(r["bytes_sent_rank0"]) for r in rows][0] == 0 and int(rows[1]["bytes_sent_rank0"]) > 0
    md = written["md"].read_text()
    assert "## test/acc by strategy.p" in md and "| 0 |" in md and "| 1 |" in md
    png = written["png"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000

    # the command-line form writes the same files elsewhere
    out = tmp_path / "table"
    proc = subprocess.run([sys.executable, "-m", "lightning_gossip.sweep", str(sweep_dir), "--out", str(out),
                           "--y", "val/acc"], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))
    check(proc)
    assert "## val/acc by strategy.p" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["sweep.csv", "sweep.md", "sweep.png"]


def test_missing_dataset_fails_fast_with_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-dataset"
    proc = run_train([*TINY, "data=image_folder", f"data.path={missing}", f"hydra.run.dir={tmp_path / 'run'}"],
                     cwd=tmp_path, timeout=180)
    assert proc.returncode != 0
    assert "is not a directory" in proc.stderr and str(missing) in proc.stderr
    assert "starting 2 worker processes" not in proc.stdout + proc.stderr  # failed before starting any


@pytest.mark.slow
def test_spawn_and_popen_launchers_give_the_same_model(tmp_path):
    """The Hydra-safe popen path and torch.multiprocessing spawn run the same algorithm: same seed, same result."""
    results = []
    for launcher in ("gossip", "gossip_spawn"):
        run_dir = tmp_path / launcher
        check(run_train([*TINY, f"strategy={launcher}", "strategy.p=0.5", "data.split=label_skew",
                         f"hydra.run.dir={run_dir}"], cwd=tmp_path, timeout=400))
        results.append(json.loads((run_dir / "results.json").read_text())["metrics"])
    assert results[0]["test/acc"] == results[1]["test/acc"]
    assert results[0]["test/loss"] == pytest.approx(results[1]["test/loss"], rel=1e-6)


@pytest.mark.slow
def test_a_crashed_job_does_not_poison_the_next_one(tmp_path):
    """Job 0 loses a worker mid-training (mid-exchange, p=1); job 1 of the same multirun must still run normally."""
    sweep_dir = tmp_path / "sweep"
    proc = run_train(["-m", *TINY, "strategy.p=1", "trainer.limit_train_batches=8",
                      "+callbacks.crash._target_=tests.experiments.crash.KillRankAtStep",
                      "+callbacks.crash.at_step=3,1000", f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=400)
    assert proc.returncode != 0  # Hydra reports the failed job at the end of the sweep
    output = proc.stdout + proc.stderr
    assert "Worker processes failed (" in output and "rank 1: exit code 3" in output  # names the lost rank
    assert not (sweep_dir / "0" / "results.json").exists()
    result = json.loads((sweep_dir / "1" / "results.json").read_text())
    assert result["global_step"] == 8 and result["gossip_counters"]["messages_sent"] == 8
