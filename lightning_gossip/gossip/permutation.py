"""The epoch's order of a dataset, and its pieces: one home for every sampler that shares a dataset out between ranks.

Every rank derives the same order of ``range(num_samples)`` from ``(seed, epoch)`` alone, without talking to the
others, and takes pieces of it: an equal, fixed shard per rank (the experiment app's static sharding, see
``lightning_gossip.app.data``) or chunks claimed one after another through the store
(:class:`~lightning_gossip.gossip.work_sharing.WorkSharingSampler`). Piece ``i`` of size ``s`` is
``order[i * s : (i + 1) * s]``, so distinct pieces never overlap and, together, cover the order once.

The generator is numpy's PCG64 seeded with the sequence ``[seed, epoch, *stream]`` (a ``SeedSequence``), so
``(seed=1, epoch=0)`` and ``(seed=0, epoch=1)`` give unrelated orders, and a caller that needs more draws per epoch
(one stream per rank, say) adds to the key instead of inventing a seed formula of its own.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# SeedSequence takes non-negative integers: a negative seed is taken modulo 2**64 (the same map torch's
# Generator.manual_seed applies), so any integer seed works and non-negative ones are used as they are.
_SEED_SPACE = 2**64


def epoch_generator(seed: int, epoch: int, *stream: int) -> np.random.Generator:
    """The random generator of ``(seed, epoch, *stream)``: the same draws on every rank that asks for the same key."""
    return np.random.default_rng([int(k) % _SEED_SPACE for k in (seed, epoch, *stream)])


def epoch_permutation(num_samples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The epoch's order of ``range(num_samples)``, identical on every rank (``shuffle=False``: the natural order)."""
    if num_samples < 0:
        raise ValueError(f"num_samples must be >= 0, got {num_samples}.")
    if not shuffle:
        return np.arange(num_samples, dtype=np.int64)
    return epoch_generator(seed, epoch).permutation(num_samples)


def piece(order: Any, index: int, size: int) -> Any:
    """Piece ``index`` of ``order`` cut into pieces of ``size`` (the last one may be shorter, past the end empty)."""
    if size < 1 or index < 0:
        raise ValueError(f"a piece needs size >= 1 and index >= 0, got size={size}, index={index}.")
    return order[index * size : (index + 1) * size]
