"""A rank that hangs (SIGSTOP: the process stays, every thread frozen) ends the run within the process-group timeout
plus a few seconds, whichever rank it is, and every other rank's error names it.

Rank 0 is the hard case: it hosts the process group's store, so asking the store hangs too (a TCPStore client
retries a read that gets no answer for ever), and under Lightning's launcher it is the job's main process, which a
stopped process never ends. The ranks on its host kill it (``lightning_gossip.gossip.health``)."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from tests.helpers.distributed import free_port
from tests.helpers.processes import Run, run_script
from tests.reliability import SCRIPTS
from tests.reliability.workers import fault_worker

# The process-group timeout of the plain-averager runs, and what "a few seconds" after it may take on 2 busy cores:
# the watchdog looks every 0.5 s at heartbeats written every second, and the error path then asks the store once.
TIMEOUT_S = 6.0
FEW_S = 8.0


@pytest.fixture(autouse=True, scope="module")
def _warm_imports() -> None:
    """The first optimizer imports torch._dynamo (and sympy): seconds of CPU with the GIL held on a loaded machine,
    which would delay the forked ranks' heartbeats. Import it once here; the ranks inherit it."""
    import torch

    torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)


def _run_hang(fault_rank: int, asynchronous: bool, world_size: int = 3) -> tuple[dict, list, float]:
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(target=fault_worker,
                    args=(r, world_size, port, "hang", fault_rank, 30, TIMEOUT_S, queue, asynchronous))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    reports: dict[int, tuple] = {}
    ended: dict[int, float] = {}
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (len(reports) < world_size or len(ended) < world_size):
            while not queue.empty():
                rank, *rest = queue.get()
                reports[rank] = tuple(rest)
            for r, p in enumerate(procs):
                if r not in ended and p.exitcode is not None:
                    ended[r] = time.time()
            time.sleep(0.05)
    finally:
        codes = [p.exitcode for p in procs]
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    return reports, codes, ended


def test_store_call_to_a_stopped_host_raises_instead_of_hanging() -> None:
    """The root of the hung-rank-0 hang: a TCPStore read whose host is stopped never returns (the client retries
    without end, whatever its timeout). Through the deadline store it raises, naming the host, and the next call
    fails at once (the connection is stuck behind the first)."""
    import os
    import signal
    import subprocess
    import sys
    from datetime import timedelta

    import torch.distributed as dist

    from lightning_gossip.gossip.health import DeadlineStore, StoreUnresponsiveError

    port = free_port()
    code = (f"import time, torch.distributed as d; s = d.TCPStore('127.0.0.1', {port}, is_master=True, "
            "wait_for_workers=False); s.set('k', 'v'); print('READY', flush=True); time.sleep(300)")
    host = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert host.stdout is not None and host.stdout.readline().strip() == "READY"
        client = dist.TCPStore("127.0.0.1", port, is_master=False, timeout=timedelta(seconds=1))
        store = DeadlineStore(client, lambda: "the test's store host")
        assert store.get("k") == b"v"
        os.kill(host.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(StoreUnresponsiveError, match="its host, the test's store host, hangs"):
            store.get("k")
        assert time.monotonic() - start < 1 + 2 + 2  # the store's timeout, the margin, and some slack
        start = time.monotonic()
        with pytest.raises(StoreUnresponsiveError):
            store.add("n", 1)
        assert time.monotonic() - start < 0.5
    finally:
        host.kill()
        host.wait(timeout=30)


@pytest.mark.parametrize(
    "fault_rank, asynchronous",
    [(0, False), pytest.param(0, True, marks=pytest.mark.slow), pytest.param(2, False, marks=pytest.mark.slow), (2, True)],
    ids=["store_host_rank0-lockstep", "store_host_rank0-async", "rank2-lockstep", "rank2-async"],
)
def test_hung_rank_ends_the_run_and_is_named(fault_rank: int, asynchronous: bool) -> None:
    reports, codes, ended = _run_hang(fault_rank, asynchronous)
    assert fault_rank in reports and reports[fault_rank][0] == "fault", reports
    fault_time = reports[fault_rank][1]
    survivors = [r for r in range(3) if r != fault_rank]
    for r in survivors:
        assert r in reports, (r, reports)
        kind, when, text, peers = reports[r]
        assert kind == "GossipPeerError", text
        assert peers == [fault_rank], (peers, text)  # the hung rank, not the live peer this rank waited for
        # named with its process, as hung (killed meanwhile by a watchdog, it is "hung ... and is gone now")
        assert re.search(rf"rank {fault_rank} \(pid \d+ on host [^)]*\) (hangs|hung)", text), text
        assert when - fault_time < TIMEOUT_S + FEW_S, (when - fault_time, text)
        assert codes[r] == 0, codes  # each survivor got the error and ended on its own
    # the stopped process cannot end by itself: a survivor on its host killed it, so the run ends
    assert codes[fault_rank] == -9, codes
    print(f"averager, hung rank {fault_rank} ({'asynchronous' if asynchronous else 'lock-step'}, timeout "
          f"{TIMEOUT_S:.0f} s): errors after " + ", ".join(f"{reports[r][1] - fault_time:.1f}" for r in survivors)
          + f" s; every process gone after {max(ended.values()) - fault_time:.1f} s")
    assert max(ended.values()) - fault_time < TIMEOUT_S + FEW_S, (ended, fault_time)


# -- through Lightning's launcher and Fabric's: real process trees --------------------------------------------------
# The process-group timeout of these runs: it also bounds the start-up rendezvous, which takes tens of seconds when 3
# processes import Lightning on 2 busy cores. "A few seconds" after it, on such a machine: the error path, Lightning's
# teardown and the interpreter's exit of 3 processes.
LAUNCHED_TIMEOUT_S = 60
LAUNCHED_SLACK_S = 25


def _fault_time(out: Path) -> float:
    return float((out / "fault.txt").read_text().split()[0])


def _no_live_rank_named_lost(output: str, hung: int, world_size: int = 3) -> None:
    """Every GossipPeerError names the hung rank as the one lost, never a live one."""
    lost = re.findall(r"lost gossip peer (?:rank|ranks) ([\d, ]+)", output)
    assert lost, output[-6000:]
    for named in lost:
        assert [int(r) for r in named.split(",")] == [hung], (named, output[-6000:])


@pytest.mark.slow
@pytest.mark.parametrize("asynchronous", [False, True], ids=["lockstep", "async"])
@pytest.mark.parametrize("hung", [0, 2], ids=["rank0_launcher_and_store_host", "rank2"])
def test_lightning_hung_rank_ends_the_run(tmp_path: Path, hung: int, asynchronous: bool) -> None:
    """Trainer with Lightning's popen launcher, 3 workers: rank ``hung`` is SIGSTOPped after its 11th step. Rank 0 is
    the launcher (the job's main process) and hosts the store. Before: with rank 0 stopped, the run was still going
    266 s (lock-step) / 90 s (asynchronous) later with timeout=20 s."""
    out = tmp_path / "run"
    plan = [{"name": "hang", "epochs": 400}]
    args = [str(out), "--devices", "3", "--n", "240", "--p", "0.5", "--timeout-s", str(LAUNCHED_TIMEOUT_S),
            "--plan", json.dumps(plan), "--stop-rank", str(hung), "--stop-step", "10"]
    if asynchronous:
        args.append("--asynchronous")
    run = run_script(SCRIPTS / "gossip_fit.py", args, timeout=LAUNCHED_TIMEOUT_S * 4 + 120, linger=LAUNCHED_SLACK_S)
    assert f"FAULT: rank {hung} stopped" in run.output, run.output[-4000:]
    assert not run.survivors, f"processes left behind: {run.survivors}\n{run.output[-4000:]}"
    assert run.returncode != 0
    took = run.ended_at - _fault_time(out)
    print(f"hung rank {hung} ({'asynchronous' if asynchronous else 'lock-step'}): every process gone {took:.1f} s "
          f"after the SIGSTOP (timeout {LAUNCHED_TIMEOUT_S} s)")
    assert took < LAUNCHED_TIMEOUT_S + LAUNCHED_SLACK_S, (took, run.output[-6000:])
    assert f"rank {hung} (pid" in run.output, run.output[-6000:]
    _no_live_rank_named_lost(run.output, hung)


def _fabric(tmp_path: Path, *args: str, timeout_s: float) -> tuple[Path, Run]:
    out = tmp_path / "run"
    out.mkdir()
    run = run_script(SCRIPTS / "fabric_fault.py", [str(out), "--devices", "3", "--timeout-s", str(timeout_s), *args],
                     timeout=timeout_s * 4 + 120, linger=LAUNCHED_SLACK_S)
    return out, run


def _errors(out: Path) -> dict[int, list[str]]:
    return {int(p.stem[len("error_rank"):]): p.read_text().splitlines() for p in out.glob("error_rank*.txt")}


@pytest.mark.parametrize("strategy", ["gossip", pytest.param("gossip_async", marks=pytest.mark.slow)])
def test_fabric_lost_rank_is_named_on_every_survivor(tmp_path: Path, strategy: str) -> None:
    """A user's Fabric loop (gossip steps, fabric.all_reduce and fabric.barrier every epoch), 3 ranks; rank 2 is
    SIGKILLed. Before: the survivors' first error was gloo's raw ``RuntimeError ... Connection closed by peer``."""
    out, run = _fabric(tmp_path, "--kill-rank", "2", "--strategy", strategy, timeout_s=LAUNCHED_TIMEOUT_S)
    assert "FAULT: rank 2 killed" in run.output, run.output[-4000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    errors = _errors(out)
    assert sorted(errors) == [0, 1], (errors, run.output[-4000:])
    for rank, (when, kind, message, *_) in errors.items():
        assert kind == "lightning_gossip.gossip.errors.GossipPeerError", (rank, kind, message)
        assert "lost gossip peer rank 2" in message, message
        assert float(when) - _fault_time(out) < LAUNCHED_TIMEOUT_S / 2, (rank, message)  # at once, not the timeout
    print(f"Fabric ({strategy}), rank 2 SIGKILLed: named by ranks 0 and 1 after "
          + ", ".join(f"{float(errors[r][0]) - _fault_time(out):.1f}" for r in (0, 1))
          + f" s; every process gone after {run.ended_at - _fault_time(out):.1f} s")
    _no_live_rank_named_lost(run.output, 2)


@pytest.mark.slow
def test_fabric_hung_rank_ends_the_run(tmp_path: Path) -> None:
    """Rank 2 of a Fabric loop is SIGSTOPped. Before: the others exited and the stopped process was left behind."""
    out, run = _fabric(tmp_path, "--stop-rank", "2", timeout_s=LAUNCHED_TIMEOUT_S)
    assert "FAULT: rank 2 stopped" in run.output, run.output[-4000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    took = run.ended_at - _fault_time(out)
    print(f"Fabric, hung rank 2: every process gone {took:.1f} s after the SIGSTOP (timeout {LAUNCHED_TIMEOUT_S} s)")
    assert took < LAUNCHED_TIMEOUT_S + LAUNCHED_SLACK_S, (took, run.output[-6000:])
    errors = _errors(out)
    assert sorted(errors) == [0, 1], errors
    for rank, (_, kind, message, *_) in errors.items():
        assert kind == "lightning_gossip.gossip.errors.GossipPeerError" and "lost gossip peer rank 2" in message
    _no_live_rank_named_lost(run.output, 2)
