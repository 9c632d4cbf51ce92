"""What the Trainer strategy and the Fabric strategy share beyond the core: read-outs of the averager and the
checkpoint key. Plain Python, no Lightning import, so both adapters (and their standalone renamings) use it as is."""

from __future__ import annotations

from typing import Optional

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
