"""What the Trainer strategy and the Fabric strategy share beyond the core: read-outs of the averager, the
checkpoint key, and the process group's end at exit. Plain Python, no Lightning import, so both adapters (and their
standalone renamings) use it as is."""

from __future__ import annotations

import atexit
from contextlib import suppress
from typing import Optional

import torch.distributed as dist

from lightning_gossip.gossip import GossipAverager, GossipCounters

# where a checkpoint keeps the gossip state (per-rank parts, or every rank's state)
CHECKPOINT_KEY = "gossip"


class AveragerReadouts:
    """``gossip_weight``, ``counters`` and ``gossip_step`` of a strategy's ``averager`` (defaults before setup)."""

    averager: Optional[GossipAverager]
    world_size: int

    @property
    def gossip_weight(self) -> float:
        """This rank's gossip weight a_i (float64). Over all ranks (and messages in flight) they sum to 1."""
        return self.averager.weight if self.averager is not None else 1.0 / max(1, self.world_size)

    @property
    def counters(self) -> GossipCounters:
        """Messages and bytes this rank sent and received, rejected messages, gossip steps taken."""
        return self.averager.counters if self.averager is not None else GossipCounters()

    @property
    def gossip_step(self) -> int:
        """The schedule position: how many gossip steps (optimizer steps) this rank has taken."""
        return self.averager.step_count if self.averager is not None else 0


_AT_EXIT_REGISTERED = False


def destroy_process_group_at_exit() -> None:
    """Destroy the default process group when the interpreter exits, before the C++ runtime tears it down.

    A gloo process group still alive at interpreter exit is destroyed by static destructors in no particular order,
    which now and then ends a finished run with ``terminate called without an active exception`` (exit code -6).
    Neither Lightning's Trainer teardown (a ``test`` after ``fit`` reuses the group) nor a Fabric script (Fabric has no
    end of run) destroys it, so it is destroyed at exit.
    """
    global _AT_EXIT_REGISTERED
    if _AT_EXIT_REGISTERED:
        return
    _AT_EXIT_REGISTERED = True

    def destroy() -> None:
        if dist.is_available() and dist.is_initialized():
            with suppress(Exception):
                dist.destroy_process_group()

    atexit.register(destroy)
