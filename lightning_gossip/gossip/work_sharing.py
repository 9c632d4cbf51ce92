"""Dynamic work sharing: fast ranks take more batches, yet every sample is used exactly once per epoch.

With equal shards (``DistributedSampler``) an epoch ends at the slowest rank's pace whatever the exchange does, so
asynchronous gossip would buy nothing. Here every rank derives the same permutation of the dataset from
``(seed, epoch)`` and claims the next chunk of it (a few batches) through the atomic ``add`` of the process group's
key-value store. A rank that finishes its chunk sooner claims the next one sooner; the epoch ends for every rank
when the permutation is used up. One store call per chunk (20-90 microseconds on a local TCPStore) is negligible
next to a few training steps.

Which rank sees which sample depends on timing, so runs are not reproducible sample by sample; the set of samples
of an epoch, and the order within each chunk, are.

Store keys are scoped by the sampler's *generation*: the n-th sampler a rank iterates (under one key prefix) is the
n-th on every rank, so a second training loop, fit or sweep run in the same process (same store) never finds the
first one's claim counters used up. When a rank has used up a pass it records how many samples it took; with the
invariant checks on (``GossipOptions(verify=True)``), :func:`verify_finished_passes` (called at every consistent
cut) checks that the ranks' counts of every finished pass add up to the dataset, each sample once.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import Any, Callable, Iterator, Optional, Sized

import torch.distributed as dist
from torch.utils.data import Sampler

from lightning_gossip.gossip.errors import GossipInvariantError
from lightning_gossip.gossip.permutation import epoch_permutation, piece

# Samplers with finished passes not verified yet (see verify_finished_passes).
_UNVERIFIED: "weakref.WeakSet[WorkSharingSampler]" = weakref.WeakSet()


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
        self._generation: Optional[int] = None  # which of this rank's samplers (under key_prefix) this one is
        self._finished: list[tuple[str, int]] = []  # (pass key, world size) of passes used up, not verified yet
        self._claimed_chunks = 0  # chunks of the current pass claimed by all ranks, as of this rank's last claim
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
        return epoch_permutation(self.num_samples_total, self.seed, epoch, self.shuffle).tolist()

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
        store = self.store()
        rank, world_size = self._rank_and_world_size()
        if self._generation is None:
            self._generation = store.add(f"{self.key_prefix}/generation/rank{rank}", 1)
        pass_key = f"{self.key_prefix}/gen{self._generation}/epoch{epoch}/pass{passes}"
        key = f"{pass_key}/next_chunk"
        order = self.permutation(epoch)
        chunk = self.effective_chunk_size(world_size)
        self.last_pass_samples = 0
        # Chunk r is rank r's own: every rank trains at least once per epoch, so every rank reaches the epoch's end
        # (a rank with no batch would never get there, and everything at an epoch's end needs every rank).
        index = rank
        self._claimed_chunks = world_size
        while True:
            indices = piece(order, index, chunk)
            if not indices:
                store.set(f"{pass_key}/samples/rank{rank}", str(self.last_pass_samples))
                self._finished.append((pass_key, world_size))
                _UNVERIFIED.add(self)
                return
            self.last_pass_samples += len(indices)
            yield from indices
            if self.stop is not None and self.stop():
                store.set(f"{pass_key}/samples/rank{rank}", "stopped")
                return
            # add() returns the counter after the increment: the chunk this rank now owns, exclusively.
            index = world_size + store.add(key, 1) - 1
            self._claimed_chunks = index + 1

    def verify_finished_passes(self) -> None:
        """Raise :class:`GossipInvariantError` if the ranks' sample counts of a pass every rank used up do not add
        up to the dataset (passes some rank has not finished, or stopped early, are left for a later call)."""
        store = self.store()
        waiting = []
        for pass_key, world_size in self._finished:
            keys = [f"{pass_key}/samples/rank{r}" for r in range(world_size)]
            if not store.check(keys):
                waiting.append((pass_key, world_size))
                continue
            counts = [store.get(key).decode() for key in keys]
            if "stopped" in counts:
                continue
            taken = [int(count) for count in counts]
            if sum(taken) != self.num_samples_total:
                per_rank = ", ".join(f"rank {r}: {n}" for r, n in enumerate(taken))
                raise GossipInvariantError(
                    "coverage",
                    f"the ranks took {sum(taken)} samples in the work-sharing pass {pass_key!r} ({per_rank}), but the "
                    f"dataset has {self.num_samples_total}: every sample must be used exactly once per epoch (were the "
                    "claim counters in the store shared with another run?).",
                    ranks=list(range(world_size)),
                )
        self._finished = waiting
        if not waiting:
            _UNVERIFIED.discard(self)

    @property
    def world_size(self) -> int:
        return self._rank_and_world_size()[1]

    def batches_per_pass(self) -> int:
        """The batches of one pass over all ranks (every chunk is whole batches; the last chunk may be short)."""
        chunk = self.effective_chunk_size(self.world_size)
        full, rest = divmod(self.num_samples_total, chunk)
        return full * (chunk // self.batch_size) + math.ceil(rest / self.batch_size)

    def batches_finished_by_all(self) -> int:
        """At least how many batches of the current pass all ranks together have finished, as of this rank's last
        claim: the chunks claimed, less the one each rank may still be working on."""
        world_size = self.world_size
        chunk_batches = self.effective_chunk_size(world_size) // self.batch_size
        finished = (self._claimed_chunks - world_size) * chunk_batches
        return max(0, min(finished, self.batches_per_pass()))

    # No __len__ on purpose: a rank's share depends on the ranks' speeds. A DataLoader over this sampler is then
    # unsized, which Lightning handles as it does an iterable dataset: the epoch ends when the data does (a length
    # would end every rank's epoch after that many batches, or never reach the validation at the epoch's end).
    def estimated_length(self) -> int:
        """The share of an equally fast rank, in samples (for progress reports; the true share varies)."""
        _, world_size = self._rank_and_world_size()
        return math.ceil(self.num_samples_total / max(1, world_size))


def verify_finished_passes() -> None:
    """:meth:`WorkSharingSampler.verify_finished_passes` for every sampler of this process with finished passes."""
    for sampler in list(_UNVERIFIED):
        sampler.verify_finished_passes()
