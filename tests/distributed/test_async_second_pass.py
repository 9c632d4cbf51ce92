"""The asynchronous mode's second pass (issue 17), with the plain-torch core on real gloo processes: looking at the
consensus keeps every message (item 1), a second training loop in the same process uses every sample (item 2), and
the invariant checks raise, naming the invariant, when an invariant is broken."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from lightning_gossip.gossip import GossipAverager
from lightning_gossip.gossip.errors import GossipInvariantError
from lightning_gossip.gossip.work_sharing import WorkSharingSampler
from tests.helpers.distributed import run_distributed


def _ranks_differ(model: nn.Module, rank: int) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(torch.randn(t.shape, generator=g))


def _look_while_messages_fly(rank: int, world_size: int):
    torch.manual_seed(0)
    model = nn.Linear(16, 8)
    # verify=False: this test measures the drift itself (with verify=True the swap's own check would raise first)
    averager = GossipAverager(model, p=1.0, asynchronous=True, seed=rank, verify=False)
    _ranks_differ(model, rank)
    start, _ = averager.weighted_mean()  # a consistent cut: the exact mean, nothing in flight
    for _ in range(5):
        for _ in range(3):
            averager.step()  # lr = 0: gossip alone, which never moves the mean; pushes are on the wire now
        with averager.consensus_swapped_in():  # what validation, a checkpoint or Fabric's evaluating() do
            pass
    averager.finish()
    end, total = averager.exact_mean()
    averager.end()
    return float((end - start).abs().max()), total, averager.counters.messages_sent


def test_looking_at_the_consensus_keeps_every_message():
    results = run_distributed(_look_while_messages_fly, 3, timeout=180)
    for drift, total, sent in results:
        # Before the fix the swap copied the weights before the messages were mixed in and put that copy back: the
        # messages' weight stayed and their values were lost (0.29 per weight in the issue's run).
        assert drift < 1e-6, drift
        assert abs(total - 1.0) < 1e-12
    assert sum(r[2] for r in results) > 0


N = 72


def _one_loop(rank: int, world_size: int, model: nn.Module, averager: GossipAverager) -> list[int]:
    sampler = WorkSharingSampler(N, batch_size=4, seed=0)
    loader = DataLoader(list(range(N)), batch_size=4, sampler=sampler)
    seen: list[int] = []
    sampler.set_epoch(0)
    for batch in loader:
        seen += batch.tolist()
        averager.step()
    averager.finish()  # quiescence at the epoch's end: with verify on, coverage is checked here
    return seen


def _readme_loop_twice(rank: int, world_size: int):
    torch.manual_seed(0)
    out = []
    for _ in range(2):  # the README's plain-torch loop, run twice in one process (a sweep, a notebook)
        model = nn.Linear(4, 2)
        averager = GossipAverager(model, p=0.5, asynchronous=True, seed=0)
        out.append(_one_loop(rank, world_size, model, averager))
        averager.end()
    return out


def test_a_second_loop_in_the_same_process_uses_every_sample():
    results = run_distributed(_readme_loop_twice, 2, timeout=180)
    for loop in range(2):
        used = sorted(i for rank in results for i in rank[loop])
        assert used == list(range(N)), f"loop {loop} used {len(used)} of {N} samples"


def _broken_invariants(rank: int, world_size: int):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    averager = GossipAverager(model, p=0.5, seed=0)
    errors = {}
    averager.state.weight += 0.25 if rank == 1 else 0.0  # mass created on rank 1
    try:
        averager.cut("a test")
    except GossipInvariantError as error:
        errors["mass"] = (error.invariant, str(error))
    averager.state.weight = 1.0 / world_size
    mean, _ = averager.weighted_mean()
    try:
        averager.verifier.mean_unchanged(mean + 0.29, "a look that lost messages")
    except GossipInvariantError as error:
        errors["mean"] = (error.invariant, str(error))
    # a work-sharing pass whose counters were used up before it started (what a reused store key did)
    sampler = WorkSharingSampler(N, batch_size=4, seed=0)
    store = dist.distributed_c10d._get_default_store()
    for _ in range(2):
        sampler._generation = None
    generation = store.add(f"{sampler.key_prefix}/generation/rank{rank}", 0) + 1
    store.add(f"{sampler.key_prefix}/gen{generation}/epoch0/pass0/next_chunk", 1000)  # another run's claims
    list(sampler)
    dist.barrier()
    try:
        averager.cut("the end of an epoch")
    except GossipInvariantError as error:
        errors["coverage"] = (error.invariant, str(error))
    return errors


def test_a_broken_invariant_raises_naming_it():
    results = run_distributed(_broken_invariants, 2, timeout=180)
    for errors in results:
        assert errors["mass"][0] == "mass" and "sum to 1.25" in errors["mass"][1], errors
        assert errors["mean"][0] == "mean" and "0.29" in errors["mean"][1], errors
        assert errors["coverage"][0] == "coverage" and "samples" in errors["coverage"][1], errors
