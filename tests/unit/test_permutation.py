"""The permutation core (lightning_gossip.gossip.permutation): one seeded order per epoch, cut into pieces, shared by
the app's static shards and WorkSharingSampler's dynamic chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightning_gossip.gossip.permutation import epoch_generator, epoch_permutation, piece
from lightning_gossip.gossip.work_sharing import WorkSharingSampler


def test_one_order_per_seed_and_epoch():
    a = epoch_permutation(1000, seed=7, epoch=3)
    assert sorted(a.tolist()) == list(range(1000))
    assert np.array_equal(a, epoch_permutation(1000, seed=7, epoch=3))  # what every rank computes alone
    others = [epoch_permutation(1000, 7, 4), epoch_permutation(1000, 8, 3),
              # seed and epoch are separate entries of the key: no (seed + epoch) aliasing
              epoch_permutation(1000, 8, 2), epoch_permutation(1000, 6, 4)]
    assert all(not np.array_equal(a, o) for o in others)
    assert epoch_permutation(5, 7, 3, shuffle=False).tolist() == [0, 1, 2, 3, 4]
    assert epoch_permutation(0, 7, 3).tolist() == []
    # any integer seed, a negative one too (a config may hold one)
    assert sorted(epoch_permutation(50, seed=-3, epoch=0).tolist()) == list(range(50))
    with pytest.raises(ValueError, match="num_samples"):
        epoch_permutation(-1, 0, 0)


def test_streams_are_independent_and_reproducible():
    draws = [epoch_generator(1, 2, rank).random(4) for rank in range(3)]
    assert len({tuple(d) for d in draws}) == 3
    assert np.array_equal(epoch_generator(1, 2, 1).random(4), draws[1])


@pytest.mark.parametrize("n, size", [(37, 5), (40, 10), (3, 7)])
def test_pieces_are_disjoint_and_cover_the_order_once(n, size):
    order = epoch_permutation(n, 0, 0).tolist()
    pieces = [piece(order, i, size) for i in range(-(-n // size))]
    assert [i for p in pieces for i in p] == order
    assert piece(order, len(pieces), size) == []  # past the end: nothing left
    with pytest.raises(ValueError, match="size"):
        piece(order, 0, 0)


def test_static_shards_and_work_sharing_cut_the_same_order():
    """The app's IID shard r and WorkSharingSampler's first chunk of rank r are pieces of one permutation."""
    from lightning_gossip.app.data import ShardSampler

    n, world, seed = 103, 4, 12345
    store = torch.distributed.HashStore()
    for epoch in (0, 1):
        order = epoch_permutation(n, seed, epoch).tolist()
        sampler = WorkSharingSampler(n, batch_size=5, chunk_batches=2, seed=seed, store=store, world_size=1)
        sampler.set_epoch(epoch)
        assert sampler.permutation() == order
        assert list(sampler) == order  # a single rank claims every chunk in turn: the whole order
        shards = []
        for rank in range(world):
            shard = ShardSampler(n, rank, world, seed=seed)
            shard.set_epoch(epoch)
            shards.append(list(shard))
        assert shards == [piece(order, rank, n // world) for rank in range(world)]
