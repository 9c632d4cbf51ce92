"""NCCL requires every rank of a group in the group's first collective when that is a batched point-to-point call
(torch.distributed.batch_isend_irecv: "if this API is the first collective call in the group passed to dist.P2POp,
all ranks of the group must participate in this API call; otherwise, the behavior is undefined"). A gossip exchange
involves two ranks only, so the averager must run a collective over all ranks before its first exchange, also when
it skips the initial broadcast (resuming). Checked here on gloo by recording the real calls in order; the same run
on NCCL is in tests/gpu.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager
from tests.helpers.distributed import run_distributed

COLLECTIVES = ("all_gather_object", "all_gather", "all_reduce", "broadcast", "broadcast_object_list", "barrier",
               "gather_object", "all_to_all")


def _first_calls(rank: int, world_size: int, broadcast: bool) -> list[str]:
    calls: list[str] = []

    def recording(name, function):
        def wrapper(*args, **kwargs):
            group = kwargs.get("group")
            calls.append(name if group is None or group == dist.group.WORLD else f"{name}(subgroup)")
            return function(*args, **kwargs)
        return wrapper

    originals = {name: getattr(dist, name) for name in (*COLLECTIVES, "batch_isend_irecv")}
    for name, function in originals.items():
        setattr(dist, name, recording(name, function))
    try:
        torch.manual_seed(0)
        averager = GossipAverager(nn.Linear(4, 3), p=1.0, seed=1, broadcast=broadcast)
        for _ in range(3):
            averager.step()
        averager.finish()
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
    return calls


def test_a_collective_over_all_ranks_precedes_the_first_exchange():
    for broadcast in (True, False):  # False: the resume path, no initial broadcast
        for rank, calls in enumerate(run_distributed(_first_calls, 3, broadcast)):
            assert "batch_isend_irecv" in calls, calls
            first_exchange = calls.index("batch_isend_irecv")
            warm_up = [c for c in calls[:first_exchange] if c in COLLECTIVES]
            assert warm_up, f"rank {rank} (broadcast={broadcast}) exchanged before any collective: {calls}"
