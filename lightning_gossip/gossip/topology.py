"""Who a sending rank pushes its weights to.

A topology is a small object with one method, ``peer(rank, world_size, step, u)``: given the sender, the number of
workers, the gossip step and a uniform random number ``u`` in [0, 1) that every rank draws identically for this
(sender, step), it returns the receiver. Because ``u`` comes from the shared schedule, a random topology stays
deterministic and identical on every rank, which is what lets NCCL and gloo match each send with a receive.

User topologies only need that method; ``validate(world_size)`` is optional and is called once at setup so that a
topology that cannot work for a world size fails before any step is taken.
"""

from __future__ import annotations

import math
from typing import Protocol, Union, runtime_checkable


@runtime_checkable
class Topology(Protocol):
    """The interface every topology implements."""

    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        """The rank that ``rank`` sends to at gossip step ``step``; never ``rank`` itself."""
        ...


class RandomPeer:
    """GoSGD: a peer drawn uniformly among the other ``world_size - 1`` workers."""

    name = "random"

    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        # Draw among the M-1 others, then skip over ourselves.
        other = min(int(u * (world_size - 1)), world_size - 2)
        return other if other < rank else other + 1

    def __repr__(self) -> str:
        return "RandomPeer()"


class Ring:
    """A directed ring: rank i always sends to rank i + 1 (mod M)."""

    name = "ring"

    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        return (rank + 1) % world_size

    def __repr__(self) -> str:
        return "Ring()"


class Exponential:
    """The time-varying exponential graph of Stochastic Gradient Push (Assran et al., 2019).

    At step t rank i sends to i + 2^(t mod K) (mod M) with K = ceil(log2 M), so within K steps information from any
    rank can reach every other rank, yet each rank talks to one peer per step.
    """

    name = "exponential"

    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        hops = max(1, math.ceil(math.log2(world_size)))
        # 2^k < M for every k < ceil(log2 M), so the offset is never 0 mod M: nobody sends to itself.
        return (rank + 2 ** (step % hops)) % world_size

    def __repr__(self) -> str:
        return "Exponential()"


TOPOLOGIES: dict[str, type] = {"random": RandomPeer, "ring": Ring, "exponential": Exponential}

TopologyLike = Union[str, Topology]


def resolve_topology(topology: TopologyLike) -> Topology:
    """Turn a name from :data:`TOPOLOGIES` or a user object into a topology, with a clear error otherwise."""
    if isinstance(topology, str):
        try:
            return TOPOLOGIES[topology]()
        except KeyError:
            raise ValueError(
                f"Unknown gossip topology {topology!r}; choose one of {sorted(TOPOLOGIES)} "
                "or pass an object with a `peer(rank, world_size, step, u) -> int` method."
            ) from None
    if not callable(getattr(topology, "peer", None)):
        raise TypeError(
            f"A gossip topology must be one of {sorted(TOPOLOGIES)} or an object with a "
            f"`peer(rank, world_size, step, u) -> int` method; got {topology!r}."
        )
    return topology


def validate_topology(topology: Topology, world_size: int, steps_to_check: int = 64) -> None:
    """Check that ``topology`` returns a valid peer (in range, not the sender) for ``world_size`` workers.

    Runs the topology's own ``validate`` if it has one, then probes a few steps and draws so that a user topology
    that cannot work fails at setup with the offending values, not as a hang at some later step.
    """
    if world_size < 2:
        return
    own_check = getattr(topology, "validate", None)
    if callable(own_check):
        own_check(world_size)
    for step in range(steps_to_check):
        for u in (0.0, 0.5, 0.999999):
            for rank in range(world_size):
                check_peer(topology, rank, world_size, step, topology.peer(rank, world_size, step, u))


def check_peer(topology: Topology, rank: int, world_size: int, step: int, peer: object) -> int:
    """``peer`` if it is a valid receiver for ``rank`` (an int in range, not the sender), else a clear error.

    The schedule checks every user topology's answer at every step: every rank computes the same plan, so every rank
    raises the same error at the same step instead of one of them waiting for a message that never comes.
    """
    if not isinstance(peer, int) or isinstance(peer, bool):
        raise TypeError(f"Topology {topology!r} returned {peer!r} (not an int) for rank {rank}, step {step}.")
    if not 0 <= peer < world_size or peer == rank:
        raise ValueError(
            f"Topology {topology!r} does not fit world size {world_size}: rank {rank} at step {step} "
            f"would send to {peer}; a peer must be in [0, {world_size - 1}] and differ from the sender."
        )
    return peer
