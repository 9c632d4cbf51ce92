"""The Hydra app (``python -m lightning_gossip.train``) under faults, for real: a worker SIGKILLed with
``max_restarts`` (the job restarts and finishes), SIGTERM to the Hydra process (every worker stops, exit code 143),
resuming a checkpoint the app wrote, ``last.ckpt`` every epoch, two jobs started at once, and bad config values
refused before any worker starts.

Every run is a real process tree (Hydra process, torch's elastic agent in it, worker processes in sessions of their
own); every process of a run is found by a marker in its environment (see procs.AppRun) and killed by pid when a test
fails, and each wait has a timeout.
"""

from __future__ import annotations

import json
import re
import os
import signal
import time
import zipfile
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import AppRun, wait_for

# 2 workers, 4 training steps per epoch, 2 val/test batches; no loggers or progress bar (less to start on 2 cores)
TINY = ["trainer=debug", "extras.print_config=false", "callbacks.progress_bar.refresh_rate=0", "logger=none",
        "strategy.timeout.seconds=60"]
STEPS_PER_EPOCH = 4
# Starting 2 workers (Lightning and torch imported three times over) takes tens of seconds on 2 busy cores.
START_S = 240


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_lost_worker_restarts_and_resumes(tmp_path: Path) -> None:
    """max_restarts=1: rank 1 is SIGKILLed in epoch 2; the group restarts, resumes from last.ckpt, finishes epoch 3."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=3", "max_restarts=1", "shutdown_timeout=10", f"hydra.run.dir={run_dir}",
            "+callbacks.fault._target_=tests.reliability.app_faults.KillOnce",
            f"+callbacks.fault.marker_dir={tmp_path}",
            "+callbacks.fault.rank=1", f"+callbacks.fault.at_step={STEPS_PER_EPOCH + 2}"]
    with AppRun(args, tmp_path) as app:
        code = app.wait(2 * START_S)
        output = app.output
        assert code == 0, output[-6000:]
        assert not app.survivors(), app.members()
    assert "FAULT: rank 1" in output and (tmp_path / "fault.txt").exists()
    assert "restart 1 of the worker group: resuming from the job's last checkpoint" in output, output[-6000:]
    assert "Restored all states from the checkpoint" in output
    result = _result(run_dir)
    assert result["epochs"] == 3 and result["global_step"] == 3 * STEPS_PER_EPOCH, result
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 2 and last["global_step"] == 3 * STEPS_PER_EPOCH


@pytest.mark.slow
def test_lost_worker_without_restarts_fails_naming_it(tmp_path: Path) -> None:
    """max_restarts=0 (the default): the job fails at once, names the lost rank, and leaves nothing running."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=2", "shutdown_timeout=10", f"hydra.run.dir={run_dir}",
            "+callbacks.fault._target_=tests.reliability.app_faults.KillOnce",
            f"+callbacks.fault.marker_dir={tmp_path}",
            "+callbacks.fault.rank=1", "+callbacks.fault.at_step=2"]
    with AppRun(args, tmp_path) as app:
        code = app.wait(START_S + 60)
        output = app.output
        assert code != 0
        assert not app.survivors(), app.members()
    assert "Worker processes failed (rank 1: killed by SIGKILL" in output, output[-6000:]
    assert "stopped after it: rank 1" not in output  # never names a live rank as lost
    assert not (run_dir / "results.json").exists()


@pytest.mark.slow
def test_sigterm_to_the_app_stops_every_worker(tmp_path: Path) -> None:
    """SIGTERM to the Hydra process (a scheduler's preemption notice): workers stop, none is orphaned, exit 143."""
    run_dir, shutdown_timeout = tmp_path / "run", 15
    args = [*TINY, "trainer.max_epochs=1000", "trainer.limit_val_batches=1", "test=false",
            f"shutdown_timeout={shutdown_timeout}", f"hydra.run.dir={run_dir}",
            "+callbacks.mark._target_=tests.reliability.app_faults.MarkTraining",
            f"+callbacks.mark.marker_dir={tmp_path}", "+callbacks.mark.sleep_s=0.05"]
    with AppRun(args, tmp_path) as app:
        wait_for(lambda: all((tmp_path / f"training_rank{r}").exists() for r in (0, 1)) or app.proc.poll() is not None,
                 START_S, "both workers training")
        assert app.proc.poll() is None, app.output[-6000:]
        workers = [int((tmp_path / f"training_rank{r}").read_text()) for r in (0, 1)]
        sent = time.monotonic()
        os.kill(app.proc.pid, signal.SIGTERM)
        code = app.wait(shutdown_timeout + 60)
        stopped = time.monotonic() - sent
        survivors = app.survivors(linger=5)
        output = app.output
    assert code == 128 + signal.SIGTERM, output[-6000:]
    assert not survivors, f"left running: {survivors}"
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]
    assert "received SIGTERM: stopped the worker processes" in output
    assert stopped < shutdown_timeout + 30, stopped
    assert not (run_dir / "results.json").exists()
    print(f"SIGTERM to the app: every process gone {stopped:.1f} s after the signal")


@pytest.mark.slow
def test_resume_a_checkpoint_the_app_wrote(tmp_path: Path) -> None:
    """last.ckpt is rewritten every epoch (even when val/acc does not improve) and resumes with weights_only."""
    first, second = tmp_path / "first", tmp_path / "second"
    # lr 0: val/acc is the same every epoch, so the val/acc checkpoint is not rewritten after epoch 0
    with AppRun([*TINY, "trainer.max_epochs=2", "model.optimizer.lr=0.0", f"hydra.run.dir={first}"], tmp_path) as app:
        assert app.wait(START_S) == 0, app.output[-6000:]
    last = torch.load(first / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert last["epoch"] == 1 and last["global_step"] == 2 * STEPS_PER_EPOCH  # not the stale epoch 0
    assert last["hyper_parameters"]["optimizer"]["_target_"] == "torch.optim.sgd.SGD"  # plain data
    ckpt = first / "checkpoints" / "last.ckpt"
    with AppRun([*TINY, "trainer.max_epochs=3", f"ckpt_path={ckpt}", f"hydra.run.dir={second}"], tmp_path) as app:
        code = app.wait(START_S)
        output = app.output
    assert code == 0, output[-6000:]
    assert f"Restored all states from the checkpoint at {ckpt}" in output
    assert _result(second)["global_step"] == 3 * STEPS_PER_EPOCH


def test_bad_config_refused_before_any_worker_and_same_second_runs_get_their_own_folders(tmp_path: Path) -> None:
    """Two runs started together, each with a bad value: each gets its own folder, neither starts a worker."""
    logs = tmp_path / "logs"
    runs = [AppRun([*TINY, "trainer.max_epochs=abc", f"paths.log_dir={logs}"], tmp_path),
            AppRun([*TINY, "data.batch_size=0", f"paths.log_dir={logs}"], tmp_path)]
    try:
        codes = [run.wait(120) for run in runs]
        outputs = [run.output for run in runs]
    finally:
        for run in runs:
            run.__exit__()
    assert all(code != 0 for code in codes), outputs
    assert "trainer.max_epochs must be an integer >= -1 (-1: no limit) or null, got 'abc' (str)" in outputs[0]
    assert "data.batch_size must be an integer >= 1, got 0 (int)" in outputs[1]
    for output in outputs:
        assert "Invalid config (nothing was started)" in output
        assert "starting 2 worker processes" not in output
    folders = sorted(p.name for p in (logs / "train" / "runs").iterdir())
    assert len(folders) == 2, folders  # the folder name has one-second resolution, and the Hydra process's pid
    assert {f.rsplit("_", 1)[1] for f in folders} == {str(run.proc.pid) for run in runs}


# -- up-front checks, in this process ------------------------------------------------------------------------------
CONF = Path(__file__).resolve().parents[2] / "conf"


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose("train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs must be an integer >= -1 (-1: no limit) or null, got 'abc'"),
        ("trainer.max_epochs=1.5", "trainer.max_epochs must be an integer >= -1 (-1: no limit) or null, got 1.5"),
        ("trainer.devices=0", "trainer.devices must be an integer >= 1, -1, 'auto' or a list of device indices"),
        ("trainer.num_nodes=two", "trainer.num_nodes must be an integer >= 1, got 'two' (str)"),
        ("++trainer.limit_train_batches=1.5", "trainer.limit_train_batches must be an integer >= 0 (batches), a float"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps must be an integer >= 1 or null, got 0"),
        ("++trainer.accumulate_grad_batches=true", "trainer.accumulate_grad_batches must be an integer >= 1, got True"),
        ("test=maybe", "test must be true or false, got 'maybe' (str)"),
        ("seed=abc", "seed must be an integer or null, got 'abc' (str)"),
        ("max_restarts=-1", "max_restarts must be an integer >= 0, got -1 (int)"),
        ("max_restarts=abc", "max_restarts must be an integer >= 0, got 'abc' (str)"),
        ("shutdown_timeout=0", "shutdown_timeout must be a number of seconds >= 1, got 0"),
        ("data.batch_size=-8", "data.batch_size must be an integer >= 1, got -8 (int)"),
        ("strategy.final_consensus='false'", "strategy.final_consensus must be true or false, got 'false' (str)"),
        ("strategy.mix_buffers=no", "strategy.mix_buffers must be true or false, got 'no' (str)"),
        ("ckpt_path=3", "ckpt_path must be a file path, 'last', 'best' or null, got 3 (int)"),
    ],
)
def test_config_values_checked_up_front(override: str, message: str) -> None:
    from lightning_gossip.app.checks import ConfigError, check_config

    cfg = _compose([override])
    with pytest.raises(ConfigError) as info:
        check_config(cfg)
    assert message in str(info.value), str(info.value)


def test_default_config_passes_the_checks() -> None:
    from lightning_gossip.app.checks import check_config

    check_config(_compose([]))
    check_config(_compose(["trainer=debug", "strategy=ddp", "trainer.devices=auto", "ckpt_path=last"]))


def test_missing_or_truncated_checkpoint_named_up_front(tmp_path: Path) -> None:
    from lightning_gossip.app.checks import ConfigError, check_checkpoint_path

    missing = tmp_path / "nope" / "last.ckpt"
    with pytest.raises(FileNotFoundError, match=f"ckpt_path {missing} does not exist"):
        check_checkpoint_path(str(missing))
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.randn(1000)}, "epoch": 3}, whole)
    check_checkpoint_path(str(whole))
    assert zipfile.is_zipfile(whole)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ConfigError, match=f"ckpt_path {truncated} is not a readable checkpoint"):
        check_checkpoint_path(str(truncated))
    with pytest.raises(ConfigError, match="is a directory"):
        check_checkpoint_path(str(tmp_path))


def test_stale_temporary_files_of_dead_writers_removed_before_workers_start(tmp_path: Path) -> None:
    from lightning_gossip.app.checkpoints import remove_stale_temporary_files

    cfg = _compose([f"hydra.run.dir={tmp_path}", f"paths.output_dir={tmp_path}"])
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / ".last.ckpt.4242.tmp").write_bytes(b"partial")
    (folder / "last.ckpt").write_bytes(b"kept")
    remove_stale_temporary_files(cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]


def test_failure_summary_names_the_killed_rank_before_those_that_lost_it() -> None:
    """One agent poll can see both a SIGKILLed rank and a rank that already raised because it lost that peer (the
    race CI hit): the killed rank is the cause and is named first; ranks the agent stopped itself are listed apart."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    from lightning_gossip.app.failures import describe_failures

    def failure(rank: int, exitcode: int) -> ProcessFailure:
        return ProcessFailure(local_rank=rank, pid=1000 + rank, exitcode=exitcode, error_file="/nonexistent")

    lost_peer = {0: failure(0, 1), 1: failure(1, -int(signal.SIGKILL))}
    assert describe_failures(lost_peer) == "rank 1: killed by SIGKILL, rank 0: exit code 1"
    stopped = {0: failure(0, -int(signal.SIGTERM)), 1: failure(1, -int(signal.SIGKILL)), 2: failure(2, 1)}
    assert describe_failures(stopped) == "rank 1: killed by SIGKILL, rank 2: exit code 1; stopped after it: rank 0"
    assert describe_failures({3: failure(3, 2), 1: failure(1, 1)}) == "rank 1: exit code 1, rank 3: exit code 2"
    assert describe_failures({0: failure(0, -int(signal.SIGTERM))}) == "rank 0: killed by SIGTERM"


@pytest.mark.slow
def test_hung_rank0_under_the_app_ends_the_run_naming_it(tmp_path: Path) -> None:
    """The app starts its workers through torch's elastic agent, which hosts the store: rank 0 SIGSTOPped (a hung
    worker) is seen by the others' heartbeats, killed by them (same host), and the agent stops the job, which fails
    naming rank 0 within the timeout (60 s) plus a few seconds, leaving nothing running."""
    run_dir = tmp_path / "run"
    args = [*TINY, "trainer.max_epochs=1000", "shutdown_timeout=10", f"hydra.run.dir={run_dir}",
            "+callbacks.fault._target_=tests.reliability.app_faults.KillOnce", f"+callbacks.fault.marker_dir={tmp_path}",
            "+callbacks.fault.rank=0", "+callbacks.fault.at_step=6", f"+callbacks.fault.signum={int(signal.SIGSTOP)}"]
    with AppRun(args, tmp_path) as app:
        code = app.wait(START_S + 180)
        survivors = app.survivors(linger=15)
        ended = time.time()
        output = app.output
    assert code != 0, output[-6000:]
    assert not survivors, f"left running: {survivors}"
    took = ended - float((tmp_path / "fault.txt").read_text().split()[0])
    print(f"app, hung rank 0: every process gone within {took:.1f} s of the SIGSTOP (timeout 60 s)")
    assert took < 60 + 40, (took, output[-6000:])
    assert re.search(r"rank 0 \(pid \d+ on host", output), output[-6000:]
    assert not re.search(r"lost gossip peer rank [12]\b", output), output[-6000:]  # never a live rank
