"""A rank that hangs (SIGSTOP: the process stays, every thread frozen) ends the run within the process-group timeout
plus a few seconds, whichever rank it is, and every other rank's error names it.

Rank 0 is the hard case: it hosts the process group's store, so asking the store hangs too (a TCPStore client
retries a read that gets no answer for ever), and under Lightning's launcher it is the job's main process, which a
stopped process never ends. The ranks on its host kill it (``lightning_gossip.gossip.health``)."""

from __future__ import annotations

import time

import pytest
import torch.multiprocessing as mp

from tests.helpers.distributed import free_port
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
    print({r: (v[0], round(v[1] - reports.get(0, (0, 0))[1], 1)) for r, v in reports.items()}, {r: round(t - time.time(), 1) for r, t in ended.items()})
    return reports, codes, ended


@pytest.mark.parametrize("asynchronous", [False, True], ids=["lockstep", "async"])
@pytest.mark.parametrize("fault_rank", [0, 2], ids=["store_host_rank0", "rank2"])
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
        assert f"rank {fault_rank} (pid" in text and "hangs" in text, text
        assert when - fault_time < TIMEOUT_S + FEW_S, (when - fault_time, text)
        assert codes[r] == 0, codes  # each survivor got the error and ended on its own
    # the stopped process cannot end by itself: a survivor on its host killed it, so the run ends
    assert codes[fault_rank] == -9, codes
    assert max(ended.values()) - fault_time < TIMEOUT_S + FEW_S, (ended, fault_time)
