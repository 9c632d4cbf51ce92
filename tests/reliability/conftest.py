"""The real Lightning runs the reliability tests look at, each started once per session (they take most of the time).

1. ``first_runs``: 2 workers fit 2 epochs straight and 1 epoch then stop, blocking, overlapped and with staleness 3,
   with a checkpoint per epoch (one script run, six fits in the same processes).
2. ``dead_worker_run``: 3 workers; rank 2 is SIGKILLed in epoch 2, after the epoch-1 checkpoint.
3. ``killed_in_save_run``: 2 workers; rank 0 (the launcher, which writes checkpoints) is SIGKILLed in the middle of
   overwriting ``last.ckpt`` at the end of epoch 2.
4. ``resumes``: one fresh script run with 2 workers resuming the checkpoints of 1-3: the exact resumes of 1, the
   ``last.ckpt`` that survived 3, the 3-worker checkpoint of 2 onto 2 workers, and last a 32-unit model from a
   16-unit checkpoint, which must fail with a clear error.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.reliability import SCRIPTS
from tests.helpers.processes import Run, run_script, script_env

# 80 samples, batch 8, 2 workers: 5 optimizer steps per epoch (3 workers: 27 samples each, 4 steps). With p=0.4 and
# the script's seed the last step of epoch 1 has exactly one message (rank 0 -> rank 1) with 2 workers: the workers'
# models differ at the save, and in overlap mode that message is in flight when the checkpoint is written.
WORKERS = 2
STEPS_PER_EPOCH = 5
STEPS_PER_EPOCH_3 = 4
COMMON = ["--n", "80", "--p", "0.4"]
# GossipStrategy(timeout=...) in the fault runs. It also bounds the start-up (process-group rendezvous), which takes
# tens of seconds when 3 processes import Lightning on 2 busy cores; a dead peer is reported at once anyway.
FAULT_TIMEOUT_S = 60


def fit(out: Path, plan: list[dict], devices: int = WORKERS, extra: tuple = (), timeout: float = 300.0, **kw) -> Run:
    args = [str(out), "--devices", str(devices), *COMMON, *extra, "--plan", json.dumps(plan)]
    return run_script(SCRIPTS / "gossip_fit.py", args, timeout=timeout, **kw)


def ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-6000:]
    assert not run.survivors, run.survivors
    return run


@pytest.fixture(scope="session")
def first_runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("first_runs")
    ck = lambda name: str(out / f"ck_{name}")  # noqa: E731
    ok(
        fit(
            out,
            [
                # Saved in on_validation_end, while evaluation has the consensus model swapped in.
                {"name": "full", "epochs": 2, "ckpt_dir": ck("full"), "save_on_train_epoch_end": False},
                {"name": "first", "epochs": 1, "ckpt_dir": ck("first"), "save_on_train_epoch_end": False},
                # Saved at the end of the training epoch, with a message in flight.
                {"name": "ov_full", "epochs": 2, "ckpt_dir": ck("ov_full"), "overlap": True},
                {"name": "ov_first", "epochs": 1, "ckpt_dir": ck("ov_first"), "overlap": True},
                # Bounded staleness 3: the exchanges of the epoch's last 3 steps are in flight at the save.
                {"name": "st_full", "epochs": 2, "ckpt_dir": ck("st_full"), "staleness": 3},
                {"name": "st_first", "epochs": 1, "ckpt_dir": ck("st_first"), "staleness": 3},
            ],
        )
    )
    return out


@pytest.fixture(scope="session")
def dead_worker_run(tmp_path_factory) -> tuple[Path, Run]:
    out = tmp_path_factory.mktemp("dead_worker")
    plan = [{"name": "dead", "epochs": 3, "ckpt_dir": str(out / "ck")}]
    # Rank 2 dies after its 6th optimizer step: in epoch 2, after the end-of-epoch-1 checkpoint (global step 4).
    extra = ("--kill-rank", "2", "--kill-step", "5", "--timeout-s", str(FAULT_TIMEOUT_S))
    return out, fit(out, plan, devices=3, extra=extra, timeout=240, linger=FAULT_TIMEOUT_S + 30)


def _other_filesystem_tmpdir(near: Path) -> str | None:
    """A temporary directory on another filesystem than ``near`` (/dev/shm is tmpfs), or None."""
    if os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != os.stat(near).st_dev:
        path = Path("/dev/shm") / f"gossip-tests-{os.getpid()}-{near.name}"
        path.mkdir(exist_ok=True)
        return str(path)
    return None


@pytest.fixture(scope="session")
def killed_in_save_run(tmp_path_factory) -> tuple[Path, Run]:
    out = tmp_path_factory.mktemp("killed_in_save")
    # Rank 0's writes in the checkpoint directory, each a per-rank part then the main file: epoch0.ckpt, last.ckpt (end
    # of epoch 1), epoch1.ckpt, last.ckpt (epoch 2): rank 0 dies just after opening the 8th file, the overwrite of
    # last.ckpt (its part for the new save is written already).
    plan = [{"name": "killed", "epochs": 3, "ckpt_dir": str(out / "ck"), "save_last": True}]
    extra = ("--kill-in-save", "8", "--timeout-s", str(FAULT_TIMEOUT_S))
    # Lightning's own writer goes through the system temp dir and moves the file into place; on another filesystem
    # that move is a copy into last.ckpt itself. Put TMPDIR on another filesystem so that case is what is tested.
    tmpdir = _other_filesystem_tmpdir(out)
    env = script_env(**({"TMPDIR": tmpdir} if tmpdir else {}))
    try:
        return out, fit(out, plan, extra=extra, timeout=240, linger=FAULT_TIMEOUT_S + 30, env=env)
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


@pytest.fixture(scope="session")
def resumes(first_runs, dead_worker_run, killed_in_save_run, tmp_path_factory) -> tuple[Path, Run]:
    out = tmp_path_factory.mktemp("resumes")
    plan = [
        {"name": "resumed", "epochs": 2, "resume": str(first_runs / "ck_first" / "epoch0.ckpt")},
        {"name": "ov_resumed", "epochs": 2, "resume": str(first_runs / "ck_ov_first" / "epoch0.ckpt"), "overlap": True},
        {"name": "st_resumed", "epochs": 2, "resume": str(first_runs / "ck_st_first" / "epoch0.ckpt"), "staleness": 3},
        {"name": "after_crash", "epochs": 2, "resume": str(killed_in_save_run[0] / "ck" / "last.ckpt")},
        {"name": "three_to_two", "epochs": 2, "resume": str(dead_worker_run[0] / "ck" / "epoch0.ckpt")},
        {"name": "other_model", "epochs": 2, "resume": str(first_runs / "ck_first" / "epoch0.ckpt"), "hidden": 32},
    ]
    run = fit(out, plan, timeout=300)
    assert not run.survivors, run.survivors
    return out, run
