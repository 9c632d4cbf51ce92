"""Asynchronous gossip under real Lightning runs (4 CPU workers, popen launcher, one rank made slower inside its
training_step): fast ranks take more steps, every sample is used once per epoch, the ranks end identical, a
checkpoint is a consistent cut that resumes exactly, SIGTERM on one rank stops every rank, and settings that need a
collective per step are refused before any worker starts."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

import lightning_gossip
from lightning_gossip.checkpoint_io import part_path
from lightning_gossip.modes import AsynchronousModeError
from tests.helpers.distributed import free_port
from tests.helpers.processes import run_command, script_env

SCRIPT = Path(__file__).parent / "scripts" / "async_fit.py"
ROOT = Path(__file__).resolve().parents[2]
N = 768


def _env() -> dict[str, str]:
    return script_env(MASTER_PORT=str(free_port()))


def _run(out: Path, *options: str, timeout: float = 600):
    """The script in its own process group (nothing survives the test); returns the harness's Run."""
    out.mkdir(parents=True, exist_ok=True)
    return run_command([sys.executable, str(SCRIPT), str(out), *options], timeout, env=_env(), cwd=out)


def _fit(out: Path, *options: str, timeout: float = 600) -> list[dict]:
    run = _run(out, *options, timeout=timeout)
    assert run.returncode == 0 and not run.survivors, run.output[-9000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(4)]


@pytest.mark.slow
@pytest.mark.timeout(900)  # two 4-worker fits; about 2 minutes on 2 idle cores, much more on a shared machine
def test_straggler_takes_fewer_steps_every_sample_once_identical_weights_and_exact_resume(tmp_path):
    k = 4
    records = _fit(
        tmp_path / "run", "--slow-rank", "3", "--slowdown", str(k), "--epochs", "2", "--step-seconds", "0.06"
    )
    steps = [r["steps"] for r in records]
    # Nobody waits for the slow rank in an epoch: it takes clearly fewer steps (about k times fewer when the sleep
    # dominates a step; Lightning's own per-step overhead on a loaded machine narrows the ratio).
    assert steps[3] < 0.7 * min(steps[:3]), steps  # lock-step would give every rank the same count
    for epoch in (0, 1):
        everything = sorted(i for r in records for i in r["seen"][epoch])
        assert everything == list(range(N)), epoch  # every sample exactly once over all ranks
    for r in records[1:]:
        assert torch.equal(r["params"], records[0]["params"])  # final consensus: identical weights
    assert abs(sum(r["gossip_weight"] for r in records) - 1.0) < 1e-12
    assert sum(r["counters"]["messages_sent"] for r in records) == sum(
        r["counters"]["messages_received"] for r in records
    ) > 0

    # The checkpoint of epoch 0 was written at a quiescent point: a consistent cut, nothing in flight.
    ckpt = next((tmp_path / "run" / "ckpt").glob("epoch=0-*.ckpt"))
    gossip = torch.load(ckpt, weights_only=False)["gossip"]
    saved = [torch.load(part_path(str(ckpt), gossip["parts"], r), weights_only=False) for r in range(4)]
    assert abs(sum(rank["gossip"]["weight"] for rank in saved) - 1.0) < 1e-12
    assert all(not rank["gossip"].get("in_flight") for rank in saved)

    # Resume from it: every rank gets back exactly its own weights, gossip weight and optimizer state.
    resumed = _fit(tmp_path / "resumed", "--epochs", "2", "--ckpt", str(ckpt))
    for rank, (mine, record) in enumerate(zip(saved, resumed)):
        restored = record["restored"]
        assert restored["gossip_weight"] == mine["gossip"]["weight"], rank
        for key, value in mine["model"].items():
            assert torch.equal(restored["model"][key], value), (rank, key)
        saved_opt = mine["optimizer_states"][0]["state"]
        assert saved_opt and all(
            torch.equal(restored["optimizer"]["state"][i]["momentum_buffer"], s["momentum_buffer"])
            for i, s in saved_opt.items()
        ), rank
        assert sorted(i for r in resumed for i in r["seen"][1]) == list(range(N))


@pytest.mark.slow
def test_sigterm_on_one_rank_stops_every_rank(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    args = [sys.executable, str(SCRIPT), str(out), "--epochs", "1000", "--step-seconds", "0.02"]
    log = open(out / "output.log", "w")  # noqa: SIM115 - closed with the process below
    proc = subprocess.Popen(args, cwd=out, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not all((out / f"pid{r}").exists() for r in range(4)):
            assert proc.poll() is None and time.monotonic() < deadline, "the run did not start"
            time.sleep(0.2)
        time.sleep(1.0)
        pids = [int((out / f"pid{r}").read_text()) for r in range(4)]
        os.kill(pids[2], signal.SIGTERM)  # one worker only, not the launcher: only the store flag tells the others
        start = time.monotonic()
        proc.wait(timeout=60)
        stopped_after = time.monotonic() - start
        # Every worker process is gone, promptly, and no rank trained to the end (1000 epochs).
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"
        assert stopped_after < 30, stopped_after
        assert not list(out.glob("rank*.pt"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.mark.slow
def test_max_time_stops_every_rank_at_the_same_epoch_end(tmp_path):
    # Lightning's Timer would broadcast rank 0's decision after every batch; here the first rank out of time raises
    # the store's stop flag, the shared data runs out for everyone, and all stop at the same epoch's end.
    records = _fit(
        tmp_path / "run", "--epochs", "1000", "--max-seconds", "4", "--slow-rank", "1", "--slowdown", "3",
        "--n", "4096",
    )
    assert len({r["epochs"] for r in records}) == 1 and records[0]["epochs"] < 1000
    for r in records[1:]:
        assert torch.equal(r["params"], records[0]["params"])
    last = max(records[0]["seen"])
    used = [i for r in records for i in r["seen"].get(last, [])]
    assert len(used) == len(set(used))  # the epoch cut short still used no sample twice


@pytest.mark.parametrize(
    "trainer_kwargs,message",
    [
        (dict(max_steps=10), "max_steps=10"),
        (dict(val_check_interval=0.5), "val_check_interval=0.5"),
        (dict(check_val_every_n_epoch=None, val_check_interval=5), "val_check_interval=5"),
        (dict(callbacks=[L.pytorch.callbacks.ModelCheckpoint(every_n_train_steps=5)]), "every_n_train_steps"),
        (dict(limit_train_batches=0.5), "limit_train_batches=0.5"),
    ],
)
def test_settings_that_need_a_collective_per_step_are_refused_before_workers_start(trainer_kwargs, message):
    from tests.lightning.scripts.async_fit import Model, _strategy

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=_strategy(0.5), max_epochs=1, logger=False,
        enable_progress_bar=False, **trainer_kwargs,
    )
    model = Model(0.0, -1, 1.0, 64, 8, "")
    with pytest.raises(AsynchronousModeError, match=message) as error:
        trainer.fit(model)
    assert "different numbers of optimizer steps" in str(error.value)
    assert not torch.distributed.is_initialized()  # refused in the launching process, before any worker started


def test_sync_dist_logging_on_step_is_refused_with_a_clear_error(tmp_path):
    run = _run(tmp_path, "--devices", "2", "--n", "64", "--step-seconds", "0", "--sync-dist-on-step", timeout=300)
    assert run.returncode != 0 and not run.survivors
    assert "AsynchronousModeError" in run.output and "sync_dist=False inside the epoch" in run.output, run.output[-3000:]


def test_registry_name_selects_the_asynchronous_mode():
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="gossip_async", logger=False)
    assert isinstance(trainer.strategy, lightning_gossip.GossipStrategy)
    assert trainer.strategy.options.asynchronous


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gossip_outer_async_registry_name_pushes_after_each_outer_step_and_ends_at_one_consensus(tmp_path):
    """``strategy="gossip_outer_async"``: every 8 of its own steps a rank takes its outer step and pushes its new slow
    weights to a random peer (nothing in between); the slow rank takes fewer steps, every sample is used once per
    epoch, no message is lost, and every rank ends with the exact consensus."""
    from lightning_gossip.gossip.outer import RECOMMENDED_OUTER

    every = RECOMMENDED_OUTER["outer_every"]
    records = _fit(tmp_path / "run", "--strategy-name", "gossip_outer_async", "--slow-rank", "3", "--slowdown", "3",
                   "--epochs", "2", "--step-seconds", "0.03")
    steps = [r["steps"] for r in records]
    assert steps[3] < min(steps[:3]), steps
    for epoch in (0, 1):
        assert sorted(i for r in records for i in r["seen"][epoch]) == list(range(N))
    for r in records:
        counters = r["counters"]
        assert counters["messages_sent"] + counters["sends_skipped"] == r["steps"] // every, (r["steps"], counters)
    assert sum(r["counters"]["messages_sent"] for r in records) == sum(r["counters"]["messages_received"]
                                                                         for r in records)
    for r in records[1:]:
        assert torch.equal(r["params"], records[0]["params"])
