"""Where each rank stands, posted in the process group's store: training, or waiting in a named collective.

A point-to-point wait cannot tell a slow peer from one that will never send: in lock-step mode a rank whose epoch
ended early (an ``IterableDataset`` whose ranks yield different numbers of batches, a manual-optimization loop that
skipped one ``opt.step()``) goes on to the next collective (a checkpoint's broadcast, validation's consensus, the end
of fit) while its peer waits for a gossip message of a step it will never take: both wait until the process-group
timeout, and the error then blames a healthy rank.

So every rank posts, when it enters a collective, ``(how many collectives it has entered, its gossip step, what)``,
and, at its first gossip step after it, that it is training again. A rank that has waited a while for a peer's
message of step t reads the peer's post: if the peer waits in a collective this rank has not entered yet, at a step
below t, the peer has left the training loop and the message will never come, which is a
:class:`~lightning_gossip.gossip.errors.GossipScheduleError` naming both ranks and their step counts, raised within
about a second instead of after the timeout.

The store is touched only at collectives (rare in gossip: epoch ends, evaluation, checkpoints) and by a rank that
has already waited :data:`CHECK_AFTER_SECONDS`; a training step costs nothing. Every rank must post the same
collectives in the same order (the averager and the adapters post around the collectives every rank runs).
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch.distributed as dist

# A wait shorter than this is never questioned (a peer is usually just a little slower); after it, the board is
# read about this often.
CHECK_AFTER_SECONDS = 1.0


class PeerPosition(NamedTuple):
    """A peer's post: in a collective (``waiting``) or training again, after ``collectives`` collectives."""

    waiting: bool
    collectives: int
    step: int
    what: str


class StepBoard:
    """This rank's post in the store, and a read of its peers' posts.

    Args:
        scope: store key prefix, the same on every rank and new for every run (the averager's run scope).
        rank: this rank (in the gossip group).
        store: a store shared by the ranks (default: the default process group's, looked up when first used).
    """

    def __init__(self, scope: str, rank: int, store: Optional[dist.Store] = None) -> None:
        self.scope = scope
        self.rank = rank
        self._store = store
        self.collectives = 0  # collectives this rank has entered (and posted)
        self._waiting = False

    def store(self) -> dist.Store:
        if self._store is None:
            self._store = dist.distributed_c10d._get_default_store()
        return self._store

    def _key(self, rank: int) -> str:
        return f"{self.scope}/position/{rank}"

    def enter_collective(self, step: int, what: str) -> None:
        """Post that this rank, at gossip step ``step``, now waits in the collective ``what``."""
        self.collectives += 1
        self._waiting = True
        self.store().set(self._key(self.rank), f"waiting\t{self.collectives}\t{step}\t{what}")

    def back_to_training(self) -> None:
        """Post, once after a collective, that this rank trains again (cheap to call at every step)."""
        if self._waiting:
            self._waiting = False
            self.store().set(self._key(self.rank), f"training\t{self.collectives}\t-1\t")

    def position(self, rank: int) -> Optional[PeerPosition]:
        """``rank``'s last post, or None if it has posted nothing yet (or the store does not answer)."""
        try:
            store = self.store()
            key = self._key(rank)
            if not store.check([key]):
                return None
            state, collectives, step, what = store.get(key).decode().split("\t", 3)
        except Exception:  # noqa: BLE001 - the board only explains a wait; the backend's own timeout still applies
            return None
        return PeerPosition(state == "waiting", int(collectives), int(step), what)

    def left_training(self, peer: int, step: int) -> Optional[PeerPosition]:
        """The peer's position if it waits in a collective this rank has not entered, before taking step ``step``:
        then it will never send (or take) this rank's message of step ``step``."""
        position = self.position(peer)
        if position is None or not position.waiting or position.collectives <= self.collectives:
            return None
        return position if position.step <= step else None

    def describe(self, peer: int, position: PeerPosition, step: int, what: Any) -> str:
        return (
            f"Rank {self.rank} waits for {what} of gossip step {step} with rank {peer}, but rank {peer} left the "
            f"training loop after {position.step} gossip steps and waits in {position.what}. Ranks took different "
            "numbers of optimizer steps: gossip pairs ranks by step number, so every rank must take the same number "
            "of steps per epoch (equal-length shards: Lightning's DistributedSampler pads them; an IterableDataset "
            "must yield as many batches on every rank; no optimizer step skipped on some ranks only), or use the "
            "asynchronous mode (strategy='gossip_async'), where ranks may take different numbers of steps."
        )
