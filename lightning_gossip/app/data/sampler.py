"""Static per-rank samplers: this rank's equal training shard of an epoch, and its slice of an evaluation set.

Both take their order from the library's permutation core (:mod:`lightning_gossip.gossip.permutation`), the one
that :class:`~lightning_gossip.gossip.work_sharing.WorkSharingSampler` shares out dynamically in asynchronous mode.
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence, Sized

import numpy as np
from torch.utils.data import DistributedSampler, Sampler

from lightning_gossip.gossip.permutation import epoch_generator, epoch_permutation, piece


class ShardSampler(Sampler[int]):
    """This rank's training indices for one epoch; ``len`` is the same on every rank.

    IID (``parts=None``): piece ``rank`` of the epoch's permutation cut into ``num_samples // world_size`` pieces,
    like DistributedSampler but without padding. Label skew (``parts``: every rank's part, see
    :func:`~lightning_gossip.app.data.partition.label_skew_partition`): ``num_samples // world_size`` samples of the
    rank's own part, all of it in a new order (cycled when the part is smaller), so shard lengths stay equal however
    uneven the partition is.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also without a DistributedSampler), which
    changes the order (IID: also the content) of the shard.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        parts: Optional[Sequence[np.ndarray]] = None,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}.")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} training samples cannot be split over {world_size} workers.")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.parts = parts
        self.shuffle = shuffle
        self.epoch = 0
        self.shard_size = num_samples // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        if self.parts is None:  # IID: a piece of one global permutation, the same on every rank
            order = epoch_permutation(self.num_samples, self.seed, self.epoch, self.shuffle)
            return piece(order, self.rank, self.shard_size)
        part = np.asarray(self.parts[self.rank])
        rng = epoch_generator(self.seed, self.epoch, self.rank)  # the rank's own stream: parts differ by rank
        reps = -(-self.shard_size // len(part))  # ceil
        pool = np.concatenate([rng.permutation(part) if self.shuffle else part for _ in range(reps)])
        return pool[: self.shard_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.shard_size


class RankSliceSampler(DistributedSampler):
    """Evaluation: samples ``rank, rank + world_size, ...`` in order, without padding (slices differ by at most one).

    torchmetrics sync their counts over ranks, so the reported metric is exact, which it would not be with
    DistributedSampler's padding (repeated samples). It is a ``DistributedSampler`` so that a Trainer that adds
    distributed samplers itself (``use_distributed_sampler=True``, as in asynchronous mode) keeps it as it is.
    """

    def __init__(self, dataset: Sized, world_size: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=world_size, rank=rank, shuffle=False)  # checks rank < world_size
        self._slice = range(rank, len(dataset), world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self._slice)

    def __len__(self) -> int:
        return len(self._slice)
