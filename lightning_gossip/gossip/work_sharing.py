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

Surviving a lost rank (``GossipOptions(on_peer_loss="continue")``, the sampler given ``survivors``): every rank records
in the store each chunk it starts, before any of it is handed out. A chunk a rank started counts as finished once it
started the next one (with ``num_workers=0`` the loop has then trained on the chunk's last batch) or posted the end of
its pass. A rank that runs out of fresh chunks posts how many it started and waits for every rank believed alive to
do the same (a gather of the survivors, see :mod:`lightning_gossip.gossip.survival`); then every rank computes the
same list of unfinished chunks (the chunk a lost rank was working on, and any it claimed but never recorded) and the
survivors claim them through a second counter, round after round, until every chunk of the pass is finished by
exactly one rank. The lost rank's finished chunks count as used: their updates reached the survivors through its
messages, as far as they did. With worker processes (``num_workers > 0``) a chunk counts as finished once its last
batch was *loaded*: a lost rank's loaded but untrained batches are then not redone.
"""

from __future__ import annotations

import math
import numbers
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sized, Union

import torch.distributed as dist
from torch.utils.data import Sampler

from lightning_gossip.gossip.errors import GossipInvariantError
from lightning_gossip.gossip.permutation import epoch_permutation, piece

if TYPE_CHECKING:
    from lightning_gossip.gossip.survival import Survivors

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
        survivors: the run's membership with ``on_peer_loss="continue"`` (``averager.survivors``, or a callable
            returning it, or None): a lost rank's unfinished chunk is then trained by a survivor (see the module
            docstring). Without it a lost rank's unfinished chunk is not redone.

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
        survivors: Union[Survivors, Callable[[], Optional[Survivors]], None] = None,
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
        self._survivors = survivors
        # (pass key, {rank: chunks it finished}, chunk size) of passes run with survivors, not verified yet
        self._finished_surviving: list[tuple[str, dict[int, list[int]], int]] = []
        #: With survivors: the chunks each rank finished in this rank's last pass (a lost rank's count as used).
        self.finished_chunks: dict[int, list[int]] = {}
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

    def survivors(self) -> Optional[Survivors]:
        """The run's membership (``on_peer_loss="continue"``), or None."""
        source = self._survivors
        return source() if callable(source) else source

    def __iter__(self) -> Iterator[int]:
        epoch = self.epoch
        passes = self._passes.get(epoch, 0)
        self._passes[epoch] = passes + 1
        survivors = self.survivors()
        # After a loss the default store client may be held up by a group being built: the survivors' own serves.
        store = survivors.store() if survivors is not None else self.store()
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
        if survivors is not None:
            yield from self._surviving_pass(survivors, store, pass_key, order, chunk, rank, world_size)
            return
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

    def _surviving_pass(self, survivors: Survivors, store: dist.Store, pass_key: str, order: list[int], chunk: int,
                        rank: int, world_size: int) -> Iterator[int]:
        """One pass with survivors: every chunk finished by exactly one rank, a lost rank's unfinished ones by the
        survivors (see the module docstring)."""
        num_chunks = math.ceil(len(order) / chunk)
        mine = f"{pass_key}/chunks/rank{rank}"
        started = 0
        index = rank
        while index < num_chunks:
            store.append(mine, f"{index},")  # recorded before any of it is handed out
            started += 1
            yield from piece(order, index, chunk)
            if self.stop is not None and self.stop():
                store.set(f"{pass_key}/samples/rank{rank}", "stopped")
                return
            index = world_size + store.add(f"{pass_key}/next_chunk", 1) - 1
            self._claimed_chunks = index + 1
        posted: dict[int, int] = {}  # every rank's last post: how many chunks it had started (and finished)
        for round_ in range(num_chunks + 1):  # each round finishes at least one chunk, or the pass ends
            posts = survivors.gather(f"{pass_key}/end{round_}", str(started), "the end of a work-sharing pass")
            posted.update({r: int(count) for r, count in posts.items()})
            finished = _finished_chunks(store, pass_key, world_size, posted, set(posts))
            done = {i for chunks in finished.values() for i in chunks}
            unfinished = [i for i in range(num_chunks) if i not in done]
            if not unfinished:
                break
            requeue = f"{pass_key}/requeue{round_}"
            claim = store.add(requeue, 1) - 1
            while claim < len(unfinished):
                store.append(mine, f"{unfinished[claim]},")
                started += 1
                yield from piece(order, unfinished[claim], chunk)
                claim = store.add(requeue, 1) - 1
        self.finished_chunks = finished
        self.last_pass_samples = sum(len(piece(order, i, chunk)) for i in finished.get(rank, []))
        store.set(f"{pass_key}/samples/rank{rank}", str(self.last_pass_samples))
        self._finished_surviving.append((pass_key, finished, chunk))
        _UNVERIFIED.add(self)

    def verify_finished_passes(self) -> None:
        """Raise :class:`GossipInvariantError` if the ranks' sample counts of a pass every rank used up do not add
        up to the dataset (passes some rank has not finished, or stopped early, are left for a later call)."""
        for pass_key, finished, chunk in self._finished_surviving:
            self._verify_surviving_pass(pass_key, finished, chunk)
        self._finished_surviving = []
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

    def _verify_surviving_pass(self, pass_key: str, finished: dict[int, list[int]], chunk: int) -> None:
        counts: dict[int, int] = {}
        for chunks in finished.values():
            for index in chunks:
                counts[index] = counts.get(index, 0) + 1
        num_chunks = math.ceil(self.num_samples_total / chunk)
        twice = sorted(i for i, n in counts.items() if n > 1)
        missing = sorted(set(range(num_chunks)) - set(counts))
        if twice or missing:
            per_rank = ", ".join(f"rank {r}: {len(c)} chunks" for r, c in sorted(finished.items()))
            raise GossipInvariantError(
                "coverage",
                f"in the work-sharing pass {pass_key!r} (with survivors) chunks {twice} were finished by more than one "
                f"rank and chunks {missing} by none ({per_rank}): every sample must be used exactly once per epoch.",
                ranks=sorted(finished),
            )

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


def _finished_chunks(store: dist.Store, pass_key: str, world_size: int, posted: dict[int, int],
                     posting: set[int]) -> dict[int, list[int]]:
    """The chunks each rank finished in a pass, from the chunks it recorded and its posts at the end of the pass.

    A rank that posted in the last round finished every chunk it had started then (the first ``posted`` of its list;
    it may have started more since, re-queued ones). A rank that did not (it is lost) finished every chunk it started
    except the last one, unless its last post (an earlier round) counted that one too.
    """
    finished = {}
    for rank in range(world_size):
        key = f"{pass_key}/chunks/rank{rank}"
        listed = [int(i) for i in store.get(key).decode().split(",") if i] if store.check([key]) else []
        if rank in posting:
            count = posted[rank]
        elif posted.get(rank) == len(listed):
            count = len(listed)
        else:
            count = max(0, len(listed) - 1)
        finished[rank] = listed[:count]
    return finished


def verify_finished_passes() -> None:
    """:meth:`WorkSharingSampler.verify_finished_passes` for every sampler of this process with finished passes."""
    for sampler in list(_UNVERIFIED):
        sampler.verify_finished_passes()
