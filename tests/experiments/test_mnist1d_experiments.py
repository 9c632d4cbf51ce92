"""Tiny smokes of the MNIST-1D experiments (experiments/mnist1d): real gloo worker processes for a few steps, the
resumable grid (a run whose JSON exists is skipped), the report on the runs, and the schedule-cost script."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("mnist1d")

from experiments.mnist1d import grid, report  # noqa: E402
from experiments.mnist1d.loop import RunConfig, launch  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def tiny(tmp_path: Path, **kw) -> RunConfig:
    return replace(RunConfig(steps=6, eval_every=3, num_samples=600, cache_dir=str(tmp_path / "cache"),
                             timeout_s=240), **kw)


def check_result(res: dict, cfg: RunConfig) -> None:
    assert res["world_size"] == cfg.workers and [pt["step"] for pt in res["curve"]] == [3, 6]
    assert 0.0 <= res["test_acc"] <= 1.0 and len(res["own_test_acc"]) == cfg.workers
    assert len(res["peak_rss_mb"]) == cfg.workers and min(res["peak_rss_mb"]) > 10
    assert all(s > 0 for s in res["startup_s"])


@pytest.mark.parametrize("method", ["gossip", pytest.param("gossip_async", marks=pytest.mark.slow),
                                    pytest.param("local_sgd", marks=pytest.mark.slow)])
def test_loop_two_workers(tmp_path, method):
    cfg = tiny(tmp_path, method=method, workers=2, p=1.0, period=5)
    res = launch(cfg, tmp_path / "run.json")
    check_result(res, cfg)
    if method == "gossip":  # p = 1: one message per step per worker
        assert res["gossip_counters"]["messages_sent"] == 6 and res["bytes_sent_per_worker"] > 6 * res["model_bytes"]
    elif method == "gossip_async":  # p = 1: every coin comes up; a push still waiting for its receiver skips it
        counters = res["gossip_counters"]
        assert counters["messages_sent"] >= 1 and counters["messages_sent"] + counters["sends_skipped"] == 6
    else:  # PeriodicModelAverager counts from 0: it averages at steps 1 and 6, so the models agree at the end
        assert res["bytes_sent_per_worker"] == pytest.approx(2 * 2 * 0.5 * res["model_bytes"])
        assert res["final_consensus_distance"] < 1e-10 and len(set(res["own_test_acc"])) == 1


@pytest.mark.skipif(importlib.util.find_spec("torchft") is None, reason="torchft (the peers extra) not installed")
def test_loop_torchft_diloco(tmp_path):
    cfg = tiny(tmp_path, method="torchft_diloco", workers=2, period=3)
    res = launch(cfg, tmp_path / "run.json")
    check_result(res, cfg)
    assert res["final_consensus_distance"] < 1e-10  # synced at step 6: every replica holds the same model


def test_bad_config_fails_before_workers_start(tmp_path):
    with pytest.raises(ValueError, match="method must be one of"):
        launch(tiny(tmp_path, method="allreduce"), tmp_path / "x.json")
    with pytest.raises(ValueError, match="needs workers >= 2, got 1"):
        launch(tiny(tmp_path, method="gossip", workers=1), tmp_path / "x.json")


def test_grid_is_resumable_and_report_builds(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    args = ["equivalence", "--workers", "2", "--seeds", "1", "--p", "0.5", "--steps", "4", "--eval-every", "2",
            "--num-samples", "600", "--out", str(runs), "--nice", "0", "--only", "single"]
    monkeypatch.setattr(grid, "RunConfig", lambda **kw: RunConfig(cache_dir=str(tmp_path / "cache"), **kw))
    grid.main(args)
    (done,) = (runs / "equivalence").glob("single_M1_iid_b64_s1.json")
    stamp = done.stat().st_mtime_ns
    grid.main(args)  # the second call finds the JSON and runs nothing
    assert done.stat().st_mtime_ns == stamp
    assert "grid equivalence" in (runs / "equivalence" / "commands.log").read_text()
    res = json.loads(done.read_text())
    assert res["config"]["batch_size"] == 64 and res["world_size"] == 1
    report.equivalence(runs, tmp_path / "out")
    table = (tmp_path / "out" / "equivalence" / "table.md").read_text()
    assert "1 worker, batch 64" in table and (tmp_path / "out" / "equivalence" / "curves.png").stat().st_size > 0


def test_grid_lists_the_issue_sweeps(capsys):
    grid.main(["peers", "--workers", "4", "--seeds", "1", "--list", "--out", "/nonexistent-dir-for-list"])
    out = capsys.readouterr().out
    for name in ("local_sgd_M4_iid_H8_s1", "torchft_localsgd_M4", "torchft_diloco_M4", "lightning_ddp_M4",
                 "lightning_gossip_M4_iid_p0.1"):
        assert name in out


def test_grid_lists_the_asynchronous_sweep_and_the_cnn_runs(capsys):
    grid.main(["asynchronous", "--workers", "4", "--seeds", "1", "--list", "--out", "/nonexistent-dir-for-list"])
    out = capsys.readouterr().out
    for p in ("0.1", "0.5", "1"):
        assert f"gossip_async_M4_iid_p{p}_random_s1" in out
    grid.main(["equivalence", "--workers", "4", "--seeds", "1", "--model", "cnn", "--exclude", "single,ddp", "--list",
               "--out", "/nonexistent-dir-for-list"])
    out = capsys.readouterr().out
    assert "gossip_cnn_M4_iid_p0.1_random_s1" in out and "ddp" not in out and "single" not in out


def test_lightning_command_is_the_entry_point():
    cmd = grid.lightning_command(RunConfig(method="lightning_ddp", workers=8, steps=100), Path("/tmp/x"))
    assert cmd[1:3] == ["-m", "lightning_gossip.train"] and "strategy=ddp" in cmd and "trainer.devices=8" in cmd
    assert "data=mnist1d" in cmd and "model=mnist1d_mlp" in cmd and "++trainer.max_steps=100" in cmd


def test_schedule_cost_script_runs(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, "-m", "experiments.schedule_cost", "--steps", "50", "--out", str(out)],
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["world_size"] for r in rows] == [4, 64, 1024] and all(r["after_us"] > 0 for r in rows)


def test_report_builds_the_cnn_sections_from_the_committed_runs(tmp_path):
    """The CNN's label-skew and peers sections pair their runs with the CNN's own IID runs (never the MLP's)."""
    runs = REPO / "experiments" / "results" / "mnist1d" / "runs"
    report.exploration_cnn(runs, tmp_path)
    report.peers_cnn(runs, tmp_path)
    table = (tmp_path / "exploration_cnn" / "table.md").read_text()
    assert "label_skew" in table and "| iid |" in table
    assert (tmp_path / "exploration_cnn" / "local_vs_consensus_M4.png").stat().st_size > 0
    cnn_ddp = [json.loads(f.read_text())["test_acc"] for f in (runs / "equivalence_cnn").glob("ddp_cnn_M4_iid_s*.json")]
    assert f"{sum(cnn_ddp) / len(cnn_ddp):.3f}" in table  # the IID DDP row is the CNN's, not the MLP's
    peers = (tmp_path / "peers_cnn" / "table.md").read_text()
    assert "torchft DiLoCo H=8" in peers and "torch PeriodicModelAverager (Local SGD) H=8" in peers
    assert (tmp_path / "peers_cnn" / "peers.png").stat().st_size > 0
