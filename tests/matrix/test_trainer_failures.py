"""The combination matrix's cells that must end in a clear error or a clean stop, within seconds, on every rank
(issue 17): lock-step ranks that take different numbers of steps (an uneven IterableDataset, a skipped optimizer step)
raise the GossipScheduleError the README promises instead of hanging until the process-group timeout (300 s here);
a per-batch collective in asynchronous mode is refused; SIGTERM to one rank stops every rank with exit code 143 in
both modes and with both Lightning packages (on the lowest Lightning too: these are lightning_compat); a rank that
raises ends the run, naming the error."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.distributed import free_port
from tests.helpers.processes import group_members, kill_group, run_script, script_env

SCRIPT = Path(__file__).parent / "scripts" / "trainer_failures.py"


def _run(tmp_path: Path, cell: str, package: str = "lightning"):
    run = run_script(SCRIPT, [str(tmp_path), cell, "--package", package], timeout=300, cwd=tmp_path,
                     env=script_env(MASTER_PORT=str(free_port()), LIGHTNING_GOSSIP_VERIFY="1"))
    assert not run.survivors, f"processes left behind: {run.survivors}"
    return run


@pytest.mark.parametrize("cell", ["lockstep-iterable-uneven", "lockstep-manual-skip"])
def test_lockstep_ranks_with_different_step_counts_fail_fast_naming_them(tmp_path, cell):
    run = _run(tmp_path, cell)
    assert run.returncode != 0
    assert "GossipScheduleError" in run.output and "rank 1 left the training loop after" in run.output, \
        run.output[-5000:]
    assert run.elapsed < 150, run.elapsed  # the board, not the 300 s process-group timeout
    assert not list(tmp_path.glob("finished*"))


def test_a_collective_in_a_callback_inside_an_asynchronous_epoch_is_refused(tmp_path):
    run = _run(tmp_path, "async-sync-dist-in-callback")
    assert run.returncode != 0
    assert "AsynchronousModeError" in run.output and "inside a training epoch" in run.output, run.output[-5000:]
    assert run.elapsed < 150, run.elapsed


@pytest.mark.lightning_compat
@pytest.mark.parametrize("mode, package", [
    ("lockstep", "lightning"), ("async", "pytorch_lightning"),  # the default run: each mode, each package once
    pytest.param("async", "lightning", marks=pytest.mark.slow),
    pytest.param("lockstep", "pytorch_lightning", marks=pytest.mark.slow),
], ids=["lockstep-lightning", "async-pytorch_lightning", "async-lightning", "lockstep-pytorch_lightning"])
def test_sigterm_to_one_rank_stops_every_rank_with_143(tmp_path, mode, package):
    pytest.importorskip(package)
    env = script_env(MASTER_PORT=str(free_port()), LIGHTNING_GOSSIP_VERIFY="1")
    cmd = [sys.executable, str(SCRIPT), str(tmp_path), f"{mode}-sigterm", "--package", package]
    with open(tmp_path / "output.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while not (tmp_path / "pid1").exists():
                assert proc.poll() is None, (tmp_path / "output.log").read_text()[-5000:]
                assert time.monotonic() < deadline, "the run did not start"
                time.sleep(0.2)
            time.sleep(1.0)
            os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)  # a worker, not the launcher
            start = time.monotonic()
            code = proc.wait(timeout=120)
            stopped_after = time.monotonic() - start
        finally:
            survivors = group_members(proc.pid)
            kill_group(proc.pid)
            proc.wait()
    output = (tmp_path / "output.log").read_text()
    assert code == 143, (code, output[-5000:])  # preempted, not finished (0) or crashed
    assert stopped_after < 60, stopped_after
    assert not survivors and not list(tmp_path.glob("finished*")), output[-3000:]


@pytest.mark.parametrize("mode", [pytest.param("lockstep", marks=pytest.mark.slow), "async"])
def test_a_rank_that_raises_ends_the_run_with_its_error(tmp_path, mode):
    run = _run(tmp_path, f"{mode}-rank-raises")
    assert run.returncode != 0
    assert "rank 1 failed on purpose in its 5th training step" in run.output, run.output[-5000:]
    assert run.elapsed < 150, run.elapsed


@pytest.mark.lightning_compat
@pytest.mark.parametrize("package", ["lightning", "pytorch_lightning"])
def test_refusals_are_the_packages_own_before_any_worker_starts(package):
    """With pytorch_lightning the refusals see its own ModelCheckpoint (the renamed mode module), not the unified one's
    (which let `every_n_train_steps` through)."""
    import importlib

    pytest.importorskip(package)
    pl = importlib.import_module("lightning.pytorch" if package == "lightning" else "pytorch_lightning")
    adapters = importlib.import_module("lightning_gossip" if package == "lightning" else "lightning_gossip.standalone")
    modes = importlib.import_module("lightning_gossip.modes" if package == "lightning"
                                    else "lightning_gossip.standalone.modes")
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=adapters.GossipStrategy(asynchronous=True),
                         callbacks=[pl.callbacks.ModelCheckpoint(every_n_train_steps=5)], logger=False,
                         enable_progress_bar=False)

    class Model(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = __import__("torch").nn.Linear(2, 2)

    with pytest.raises(modes.AsynchronousModeError, match="every_n_train_steps"):
        trainer.fit(Model())
    assert not __import__("torch").distributed.is_initialized()
