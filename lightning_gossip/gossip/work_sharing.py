"""Dynamic work sharing: fast ranks take more batches, yet every sample is used exactly once per epoch.

With equal shards (``DistributedSampler``) an epoch ends at the slowest rank's pace whatever the exchange does, so
asynchronous gossip would buy nothing. Here every rank derives the same permutation of the dataset from
``(seed, epoch)`` and claims the next chunk of it (a few batches) through the atomic ``add`` of the process group's
key-value store. A rank that finishes its chunk sooner claims the next one sooner; the epoch ends for every rank
when the permutation is used up. One store call per chunk (20-90 microseconds on a local TCPStore) is negligible
next to a few training steps.

Which rank sees which sample depends on timing, so runs are not reproducible sample by sample; the set of samples
of an epoch, and the order within each chunk, are.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterator, Optional, Sized

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)


class WorkSharingSampler(Sampler[int]):
    """Yields this rank's share of an epoch, claimed chunk by chunk from a shared, seeded permutation.

    Args:
        data_source: the dataset (only its length is used) or the number of samples.
        batch_size: the DataLoader's batch size; chunks are whole batches so batches never straddle two claims.
        chunk_batches: batches per claim: more means fewer store calls, fewer means finer sharing at an epoch's end.
        shuffle: a new seeded permutation every epoch (``False``: the natural order, still shared out in chunks).
        seed: must be the same on every rank.
        store: a ``torch.distributed.Store`` shared by all ranks (default: the default process group's store,
            looked up when iteration starts, so the sampler can be built before the process group exists).
        world_size: the number of ranks (default: the default process group's).
        rank: this rank (default: the default process group's).
        key_prefix: the store keys' prefix (several samplers in one run need different ones).
        stop: asked before each claim; when it returns True this rank's epoch ends early (every rank should see the
            same stop, e.g. a flag in the store, so that the epoch ends for all).

    Call :meth:`set_epoch` before each epoch, as with ``DistributedSampler``. Every rank must iterate the sampler
    the same number of times per epoch (the claim counter is scoped by epoch and by pass).
    """

    def __init__(
        self,
        data_source: Sized | int,
        batch_size: int = 1,
        chunk_batches: int = 4,
        shuffle: bool = True,
        seed: int = 0,
        store: Optional[dist.Store] = None,
        world_size: Optional[int] = None,
        rank: Optional[int] = None,
        key_prefix: str = "lightning_gossip/work_sharing",
        stop: Optional[Callable[[], bool]] = None,
    ) -> None:
        self.num_samples_total = data_source if isinstance(data_source, int) else len(data_source)
        if self.num_samples_total < 0:
            raise ValueError(f"The dataset length must be >= 0, got {self.num_samples_total}.")
        self.batch_size = _positive_int("batch_size", batch_size)
        self.chunk_batches = _positive_int("chunk_batches", chunk_batches)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self._store = store
        self._world_size = world_size
        self._rank = rank
        self.key_prefix = key_prefix
        self.stop = stop
        self.epoch = 0
        self._passes: dict[int, int] = {}  # epoch -> times iterated, so a second pass gets fresh keys
        # Samples this rank took in its last pass (for progress reports and tests).
        self.last_pass_samples = 0

    @property
    def chunk_size(self) -> int:
        return self.batch_size * self.chunk_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def permutation(self, epoch: Optional[int] = None) -> list[int]:
        """The epoch's order of the dataset, identical on every rank."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return list(range(self.num_samples_total))
        generator = torch.Generator()
        generator.manual_seed(self.seed + epoch)
        return torch.randperm(self.num_samples_total, generator=generator).tolist()

    def store(self) -> dist.Store:
        if self._store is None:
            if not (dist.is_available() and dist.is_initialized()):
                raise RuntimeError(
                    "WorkSharingSampler needs a store shared by every rank: initialise the process group first "
                    "or pass store=."
                )
            self._store = dist.distributed_c10d._get_default_store()
        return self._store

    def _rank_and_world_size(self) -> tuple[int, int]:
        initialized = dist.is_available() and dist.is_initialized()
        rank = self._rank if self._rank is not None else (dist.get_rank() if initialized else 0)
        world_size = self._world_size if self._world_size is not None else (dist.get_world_size() if initialized else 1)
        return rank, world_size

    def effective_chunk_size(self, world_size: int) -> int:
        """The chunk size this epoch: ``chunk_batches`` batches, fewer if the data cannot give every rank one chunk."""
        per_rank = self.num_samples_total // world_size
        if per_rank < self.batch_size:
            raise ValueError(
                f"Work sharing needs at least one batch per rank: {self.num_samples_total} samples cannot give each of "
                f"{world_size} ranks a batch of {self.batch_size}. Use a smaller batch size or fewer ranks."
            )
        return min(self.chunk_size, per_rank // self.batch_size * self.batch_size)

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        passes = self._passes.get(epoch, 0)
        self._passes[epoch] = passes + 1
        key = f"{self.key_prefix}/epoch{epoch}/pass{passes}/next_chunk"
        order = self.permutation(epoch)
        store = self.store()
        rank, world_size = self._rank_and_world_size()
        chunk = self.effective_chunk_size(world_size)
        self.last_pass_samples = 0
        # Chunk r is rank r's own: every rank trains at least once per epoch, so every rank reaches the epoch's end
        # (a rank with no batch would never get there, and everything at an epoch's end needs every rank).
        index = rank
        while True:
            start = index * chunk
            if start >= self.num_samples_total:
                return
            indices = order[start : start + chunk]
            self.last_pass_samples += len(indices)
            yield from indices
            if self.stop is not None and self.stop():
                return
            # add() returns the counter after the increment: the chunk this rank now owns, exclusively.
            index = world_size + store.add(key, 1) - 1

    # No __len__ on purpose: a rank's share depends on the ranks' speeds. A DataLoader over this sampler is then
    # unsized, which Lightning handles as it does an iterable dataset: the epoch ends when the data does (a length
    # would end every rank's epoch after that many batches, or never reach the validation at the epoch's end).
    def estimated_length(self) -> int:
        """The share of an equally fast rank, in samples (for progress reports; the true share varies)."""
        _, world_size = self._rank_and_world_size()
        return math.ceil(self.num_samples_total / max(1, world_size))
