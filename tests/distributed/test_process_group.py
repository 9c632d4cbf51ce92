"""Gossip inside a process group that is not the whole world: ranks outside it are never touched, ranks inside it
conserve their mass among themselves, and their consensus is theirs alone."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager
from tests.helpers.distributed import run_distributed

MEMBERS = [1, 2, 3]  # of a world of 4: rank 0 stays out


def _subgroup_gossip(rank: int, world_size: int, steps: int) -> dict:
    group = dist.new_group(MEMBERS)  # every rank creates every group, in the same order
    torch.manual_seed(rank)
    model = nn.Linear(4, 3)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    if rank not in MEMBERS:
        dist.barrier()
        return {"rank": rank, "before": before, "after": torch.cat([p.detach().flatten() for p in model.parameters()])}
    averager = GossipAverager(model, p=0.7, topology="random", seed=11, group=group, staleness=1)
    start = torch.cat([p.detach().flatten().clone() for p in model.parameters()])  # rank 1's weights (group rank 0)
    g = torch.Generator().manual_seed(rank)
    with torch.no_grad():  # spread the members apart, so mixing has something to do
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
    mean0, _ = averager.weighted_mean()
    masses = []
    for _ in range(steps):
        averager.step()
        mass = torch.tensor([averager.weight + averager.in_flight_weight()], dtype=torch.float64)
        dist.all_reduce(mass, group=group)
        masses.append(float(mass))
    mean1, _ = averager.weighted_mean()
    averager.end()
    dist.barrier()
    return {
        "rank": rank,
        "group_rank": averager.rank,
        "world": averager.world_size,
        "start": start,
        "masses": masses,
        "mean_drift": float((mean1 - mean0).abs().max()),
        "after": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "weight": averager.weight,
        "sent": averager.counters.messages_sent,
    }


@pytest.mark.slow
def test_gossip_in_a_subgroup_leaves_the_rest_of_the_world_alone() -> None:
    results = run_distributed(_subgroup_gossip, 4, 40)
    outsider, members = results[0], results[1:]
    assert torch.equal(outsider["after"], outsider["before"])  # never broadcast to, never mixed into
    assert [m["group_rank"] for m in members] == [0, 1, 2] and all(m["world"] == 3 for m in members)
    for m in members:
        assert torch.equal(m["start"], members[0]["start"])  # the group's rank 0 broadcast its weights
        assert max(abs(x - 1.0) for x in m["masses"]) < 1e-12  # the group's mass, messages in flight included
        assert m["mean_drift"] < 1e-5  # gossip never moves the group's weighted mean
        assert abs(m["weight"] - 1 / 3) < 1e-12  # end(): exact consensus, a_i = 1/M of the group
        torch.testing.assert_close(m["after"], members[0]["after"], rtol=0, atol=0)
    assert sum(m["sent"] for m in members) > 0
