"""The gossip schedule: who sends to whom at step t, computed identically on every rank.

NCCL (and gloo's point-to-point path) has no receive-from-any-source, so every receiver must know whom to expect.
Every rank therefore derives the whole step's plan from ``(seed, step)`` with a counter-based generator: the draws for
step t do not depend on any earlier draw, so a resumed run, or a rank that joined late, computes the same plan without
replaying history, and no rank ever needs to talk to another to agree on it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

from lightning_gossip.gossip.topology import Topology

_MASK64 = (1 << 64) - 1

# Independent streams drawn per (seed, step, rank): one decides whether the rank sends, one picks its peer.
_STREAM_SEND = 0
_STREAM_PEER = 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step: int, rank: int, stream: int) -> float:
    """A uniform number in [0, 1) that is a pure function of its four integer arguments."""
    h = _splitmix64(seed & _MASK64)
    for counter in (step, rank, stream):
        h = _splitmix64(h ^ (counter & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


@dataclass(frozen=True)
class StepPlan:
    """The exchanges of one gossip step: ``sends[i]`` is the rank that rank i pushes to, or None."""

    step: int
    sends: tuple[Optional[int], ...]

    def target_of(self, rank: int) -> Optional[int]:
        """Whom ``rank`` sends to at this step (None: it keeps its weights)."""
        return self.sends[rank]

    def sources_of(self, rank: int) -> list[int]:
        """The ranks that send to ``rank`` at this step, in ascending order (the order they are mixed in)."""
        return [src for src, dst in enumerate(self.sends) if dst == rank]

    @property
    def num_messages(self) -> int:
        return sum(dst is not None for dst in self.sends)


class GossipSchedule:
    """Derives the :class:`StepPlan` of any step from (seed, step, p, topology, world size)."""

    def __init__(self, world_size: int, p: float, topology: Topology, seed: int = 0) -> None:
        check_probability(p)
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an integer >= 1, got {world_size!r}.")
        self.world_size = world_size
        self.p = float(p)
        self.topology = topology
        self.seed = int(seed)

    def plan(self, step: int) -> StepPlan:
        sends: list[Optional[int]] = [None] * self.world_size
        if self.world_size > 1 and self.p > 0.0:
            for rank in range(self.world_size):
                if uniform(self.seed, step, rank, _STREAM_SEND) < self.p:
                    u = uniform(self.seed, step, rank, _STREAM_PEER)
                    sends[rank] = self.topology.peer(rank, self.world_size, step, u)
        return StepPlan(step=step, sends=tuple(sends))


def check_probability(p: object) -> float:
    """Return ``p`` as a float in [0, 1], or raise an error that names the bad value and the allowed range."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):  # numbers.Real: numpy scalars too
        raise TypeError(f"Gossip probability p must be a number in [0, 1], got {p!r} ({type(p).__name__}).")
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise ValueError(f"Gossip probability p must be in [0, 1], got {p!r}.")
    return float(p)
