"""Work sharing on real gloo processes: every sample exactly once per epoch over all ranks, whatever the ranks'
speeds; a slow rank takes fewer samples; the permutation is seeded by (seed, epoch)."""

from __future__ import annotations

import random
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gossip.gossip.work_sharing import WorkSharingSampler
from tests.helpers.distributed import run_distributed


def _epochs(rank, world_size, n, batch_size, chunk_batches, epochs, max_sleep, slow_rank, num_workers):
    dataset = TensorDataset(torch.arange(n))
    sampler = WorkSharingSampler(dataset, batch_size=batch_size, chunk_batches=chunk_batches, seed=5)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    rng = random.Random(rank)
    seen = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ids = []
        for (batch,) in loader:
            delay = rng.random() * max_sleep
            time.sleep(delay * (5 if rank == slow_rank else 1))
            ids += batch.tolist()
        seen.append(ids)
        torch.distributed.barrier()  # as the quiescence at an epoch's end
    return seen, sampler.estimated_length()


@pytest.mark.parametrize("world_size,n,num_workers", [(3, 203, 0), (4, 160, 0), (2, 50, 1)])
def test_every_sample_exactly_once_per_epoch_with_random_delays(world_size, n, num_workers):
    epochs = 3
    results = run_distributed(_epochs, world_size, n, 4, 2, epochs, 0.004, -1, num_workers, timeout=180)
    for epoch in range(epochs):
        everything = [i for seen, _ in results for i in seen[epoch]]
        assert sorted(everything) == list(range(n)), epoch  # once each, none missing
    # Each rank's part of an epoch is whole chunks of one shared permutation, which changes with the epoch.
    assert results[0][0][0] != results[0][0][1]
    assert results[0][1] == -(-n // world_size)  # an equal rank's share, an estimate for progress reports


def test_a_slow_rank_takes_fewer_samples():
    n = 400
    # Random 0-10 ms per batch, 5x on rank 2: delays dominate even on a loaded machine.
    results = run_distributed(_epochs, 3, n, 4, 1, 1, 0.01, 2, 0, timeout=180)
    counts = [len(seen[0]) for seen, _ in results]
    assert sum(counts) == n
    assert counts[2] < 0.6 * min(counts[:2]), counts


def test_sampler_has_no_length_so_lightning_ends_the_epoch_when_the_data_does():
    sampler = WorkSharingSampler(10, batch_size=2, store=torch.distributed.HashStore(), world_size=2)
    with pytest.raises(TypeError):
        len(sampler)
    assert sampler.estimated_length() == 5


def test_every_rank_gets_a_chunk_even_when_chunks_are_scarce():
    # 40 samples, 4 ranks, batches of 4: chunks shrink to 2 batches so that each rank's own first chunk exists;
    # a rank with no batch would never reach the epoch's end, where everything global happens.
    store = torch.distributed.HashStore()
    samplers = [WorkSharingSampler(40, 4, chunk_batches=4, store=store, world_size=4, rank=r) for r in range(4)]
    iterators = [iter(s) for s in samplers]
    taken = [[next(it) for _ in range(8)] for it in iterators]  # every rank's own chunk, before any claim
    rest = [i for it in iterators for i in it]
    assert sorted(sum(taken, []) + rest) == list(range(40))
    with pytest.raises(ValueError, match="cannot give each of 4 ranks a batch of 16"):
        list(WorkSharingSampler(40, batch_size=16, store=store, world_size=4, rank=0))


def test_sampler_checks_its_arguments():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        WorkSharingSampler(10, batch_size=0)
    with pytest.raises(ValueError, match="chunk_batches must be an integer >= 1, got 2.5"):
        WorkSharingSampler(10, chunk_batches=2.5)


def test_single_process_with_its_own_store_uses_everything_once():
    store = torch.distributed.HashStore()
    sampler = WorkSharingSampler(37, batch_size=3, chunk_batches=2, store=store, world_size=1, seed=1)
    first = list(sampler)
    again = list(sampler)  # a second pass in the same epoch gets fresh claims
    sampler.set_epoch(1)
    other = list(sampler)
    assert sorted(first) == sorted(again) == sorted(other) == list(range(37))
    assert first == again == sampler.permutation(0) and other == sampler.permutation(1) != first


def _readme_loop(rank, world_size, n, epochs):
    """The documentation's hand-written asynchronous loop (docs/plain-torch.md), with random per-rank delays."""
    from torch import nn

    from lightning_gossip.gossip import GossipAverager

    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(n, 4), torch.arange(n))
    model = nn.Linear(4, 2)
    gossip = GossipAverager(model, p=0.5, asynchronous=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    sampler = WorkSharingSampler(dataset, batch_size=8, seed=0)
    loader = DataLoader(dataset, batch_size=8, sampler=sampler)
    rng = random.Random(rank)
    seen, masses = [], []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        ids = []
        for x, i in loader:
            time.sleep(rng.random() * 0.003 * (1 + rank))
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            gossip.step()
            ids += i.tolist()
        gossip.finish()
        mass = torch.tensor([gossip.weight], dtype=torch.float64)
        torch.distributed.all_reduce(mass)
        seen.append(ids)
        masses.append(float(mass))
    gossip.end()
    return seen, masses, nn.utils.parameters_to_vector(model.parameters()).detach()


def test_the_readme_loop_uses_every_sample_once_and_conserves_mass():
    results = run_distributed(_readme_loop, 3, 240, 2, timeout=180)
    for epoch in range(2):
        assert sorted(i for seen, _, _ in results for i in seen[epoch]) == list(range(240))
    assert all(abs(m - 1.0) < 1e-12 for _, masses, _ in results for m in masses)
    assert all(torch.equal(flat, results[0][2]) for _, _, flat in results)
