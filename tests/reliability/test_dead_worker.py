"""A worker that dies or hangs: the others stop in time with an error naming it, nothing is left running, and the last
checkpoint on disk is intact and resumes exactly.

Faults injected, for real, with processes: SIGKILL and SIGSTOP of a rank in a hand-written GossipAverager loop;
SIGKILL of a Lightning worker mid-training; SIGKILL of Lightning's rank 0 in the middle of overwriting ``last.ckpt``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers.distributed import free_port
from tests.reliability.conftest import FAULT_TIMEOUT_S, STEPS_PER_EPOCH, STEPS_PER_EPOCH_3
from tests.reliability.test_resume import assert_same_rank_state, load, rank_parts
from tests.reliability.workers import fault_worker

# Start-up and shutdown of a Lightning process tree on 2 busy cores, on top of the configured timeout.
SLACK_S = 30


@pytest.mark.parametrize("mode", ["kill", "hang"])
def test_averager_names_a_dead_or_hung_peer(mode: str) -> None:
    """3 ranks of plain GossipAverager; rank 1 is SIGKILLed (dies) or SIGSTOPped (hangs) at step 30."""
    timeout_s = 3.0
    ctx = mp.get_context("fork")  # the test process has torch imported already; spawn would re-import it 3 times
    queue = ctx.SimpleQueue()
    world_size, fault_rank = 3, 1
    port = free_port()
    procs = [
        ctx.Process(target=fault_worker, args=(r, world_size, port, mode, fault_rank, 30, timeout_s, queue))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    reports: dict[int, tuple] = {}
    try:
        deadline = time.monotonic() + 120
        while len(reports) < world_size and time.monotonic() < deadline:
            if not queue.empty():
                rank, *rest = queue.get()
                reports[rank] = tuple(rest)
            else:
                time.sleep(0.05)
        survivors = [r for r in range(world_size) if r != fault_rank]
        for r in survivors:
            procs[r].join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    assert sorted(reports) == [0, 1, 2], reports
    assert reports[fault_rank][0] == "fault"
    fault_time = reports[fault_rank][1]
    for r in survivors:
        kind, when, text, peers = reports[r]
        assert kind == "GossipPeerError", text
        # Each survivor names rank 1: directly, or as the first loss of the run (a survivor that only exchanges with
        # the other survivor sees that one stop).
        assert peers == [fault_rank] or f"lost gossip peer rank {fault_rank}" in text, text
        # what happened to it: seen by the heartbeats (gone, hung) or, without them, the likely causes
        assert re.search(r"is gone|hangs|hung|The peer process most likely died", text), text
        assert "restart it from the last checkpoint" in text
        if mode == "kill":
            assert when - fault_time < timeout_s, (when - fault_time, text)  # a dead peer is seen at once
        else:
            assert when - fault_time < 2 * timeout_s + 5, (when - fault_time, text)  # a hung one after the timeout
        assert procs[r].exitcode == 0  # the survivor got the error and ended on its own
    if mode == "hang":
        # seen as a hang: a timeout, or the heartbeats (a survivor's watchdog may kill the stopped rank first)
        assert any(re.search(r"Timed out|hangs|hung", reports[r][2]) for r in survivors)


def _fault_time(out: Path) -> float:
    return float((out / "fault.txt").read_text().split()[0])


def test_lightning_worker_killed_mid_training(dead_worker_run) -> None:
    """3 Lightning workers, GossipStrategy(timeout=60 s); rank 2 is SIGKILLed in epoch 2."""
    out, run = dead_worker_run
    assert "FAULT: rank 2 killed" in run.output
    assert run.returncode != 0, run.output[-4000:]
    # Whoever notices first says rank 2 was lost: a rank waiting for it (GossipPeerError), or rank 0's process
    # observer, which then stops every process (it polls every 5 s, so it wins when the others are slow to notice).
    named = re.search(r"lost gossip peer rank 2|lost worker rank 2 \(pid \d+, signal SIGKILL\)", run.output)
    assert named, run.output[-6000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    assert run.ended_at - _fault_time(out) < FAULT_TIMEOUT_S + SLACK_S
    assert not list(out.glob("dead_rank*.pt"))  # nobody finished training
    # The checkpoint written before the fault is intact (it is resumed onto 2 workers in test_resume).
    checkpoint = torch.load(out / "ck" / "epoch0.ckpt", weights_only=False)
    assert checkpoint["global_step"] == STEPS_PER_EPOCH_3 and checkpoint["gossip"]["world_size"] == 3
    assert len(rank_parts(out / "ck" / "epoch0.ckpt")) == 3


def test_rank0_killed_while_overwriting_last_checkpoint(killed_in_save_run) -> None:
    """Rank 0 dies after opening the file for the new last.ckpt: the old last.ckpt must still be there, whole."""
    out, run = killed_in_save_run
    assert "FAULT: rank 0 killed while writing" in run.output
    assert run.returncode == -9  # the launcher itself was killed
    # The other rank was waiting for rank 0 in Lightning's barrier after the save: it names rank 0 and stops.
    assert "Rank 1 lost gossip peer rank 0" in run.output, run.output[-6000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    assert run.ended_at - _fault_time(out) < FAULT_TIMEOUT_S + SLACK_S
    checkpoint = torch.load(out / "ck" / "last.ckpt", weights_only=False)  # loads: not torn
    assert checkpoint["global_step"] == STEPS_PER_EPOCH and checkpoint["epoch"] == 0
    assert checkpoint["gossip"]["world_size"] == 2 and len(rank_parts(out / "ck" / "last.ckpt")) == 2
    assert sorted(p.name for p in (out / "ck").glob("*.ckpt")) == ["epoch0.ckpt", "epoch1.ckpt", "last.ckpt"]
    # What the crash left is a hidden temporary file next to it, never a partial last.ckpt.
    leftovers = [p.name for p in (out / "ck").iterdir() if p.name.startswith(".last.ckpt.")]
    assert len(leftovers) == 1 and leftovers[0].endswith(".tmp"), leftovers


@pytest.mark.slow
def test_resume_after_crash_is_exact(first_runs: Path, resumes) -> None:
    """The last.ckpt that survived the crash resumes, and ends bitwise where an uninterrupted run ends."""
    out, _ = resumes
    for rank in range(2):
        resumed = load(out, "after_crash", rank)
        assert resumed["start"]["global_step"] == STEPS_PER_EPOCH
        assert_same_rank_state(load(first_runs, "full", rank), resumed, f"rank {rank}")


def test_launcher_reports_the_lost_worker_not_the_ones_it_stops(capfd) -> None:
    """Rank 0 fails because a worker died and stops the others: the dead one is reported as lost, by rank and pid,
    and the live one it then kills is not (a message must never name a live rank as lost)."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    from lightning_gossip.launchers import GossipSubprocessScriptLauncher

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    suicide = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"]
    alive, dead = subprocess.Popen(sleeper), subprocess.Popen(suicide)  # ranks 1 and 2
    try:
        dead.wait(timeout=30)
        launcher = GossipSubprocessScriptLauncher(LightningEnvironment(), 3, 1, before_launch=lambda trainer: None)
        launcher.procs = [alive, dead]
        launcher.stop_children()
        assert alive.wait(timeout=10) == -9
    finally:
        for proc in (alive, dead):
            proc.kill()
            proc.wait()
    err = capfd.readouterr().err
    assert f"GossipStrategy: lost worker rank 2 (pid {dead.pid}, signal SIGKILL)" in err, err
    assert "lost worker rank 1" not in err, err
