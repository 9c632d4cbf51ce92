"""Lock-step ranks that take different numbers of steps fail fast with a GossipScheduleError naming both ranks, not
after the process-group timeout (issue 17, item 12): the step board tells a peer that left the training loop from a
slow one."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from lightning_gossip.gossip import GossipAverager, GossipScheduleError
from tests.helpers.distributed import run_distributed

PG_TIMEOUT_S = 300.0  # far beyond what the test allows: a failure must come from the board, not the timeout


def _one_rank_stops_early(rank: int, world_size: int, short_rank: int, ending: str):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    averager = GossipAverager(model, p=1.0, topology="ring", seed=0)  # every rank sends and receives every step
    steps = 6 if rank == short_rank else 8
    start = time.monotonic()
    try:
        for _ in range(steps):
            averager.step()
        if ending == "end":
            averager.end()
        else:
            averager.consensus_distance()  # what an epoch's end does: a collective (validation, the monitor)
        return ("finished", time.monotonic() - start, "")
    except GossipScheduleError as error:
        return ("schedule_error", time.monotonic() - start, str(error))
    except Exception as error:  # noqa: BLE001 - the ranks that waited in a collective see the others leave
        return (type(error).__name__, time.monotonic() - start, str(error))


@pytest.mark.parametrize("ending", ["end", "collective"])
def test_a_rank_that_left_the_loop_is_named_within_seconds(ending):
    results = run_distributed(_one_rank_stops_early, 3, 1, ending, timeout=120, pg_timeout_s=PG_TIMEOUT_S)
    errors = [r for r in results if r[0] == "schedule_error"]
    # A rank that waits for rank 1's message of step 6 (rank 1 stopped after 6 steps) raises, naming both ranks.
    assert errors, results
    kind, seconds, text = errors[0]
    assert seconds < 30, results
    assert "rank 1 left the training loop after 6 gossip steps" in text, text
    assert "different numbers of optimizer steps" in text
    # Nobody finished as if nothing had happened, and nobody waited for the process-group timeout.
    assert all(r[0] != "finished" for r in results if r is not None), results
    assert all(r[1] < PG_TIMEOUT_S / 2 for r in results), results
