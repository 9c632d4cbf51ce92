"""The GoSGD algorithm in plain torch / torch.distributed; nothing here imports Lightning or Hydra.

Layers, each using only the ones below it: :mod:`options` (every setting, checked once) -> :mod:`averager` (the run's
lifecycle) -> :mod:`exchange` (moves messages, owns those in flight) -> :mod:`schedule` / :mod:`topology` (who sends
to whom) and :mod:`state` (the flat view of the model, the gossip weight and the mixing rule); :mod:`outer` is the
optional outer optimizer (slow weights, outer momentum, a random pairing every H steps) the averager steps. Beside
them, :mod:`health` (heartbeats in the store, the hang watchdog) and :mod:`errors` (a lost peer named).
"""

from lightning_gossip.gossip.averager import GossipAverager
from lightning_gossip.gossip.counters import GossipCounters
from lightning_gossip.gossip.errors import GossipPeerError, GossipScheduleError, NonFiniteGossipError
from lightning_gossip.gossip.exchange import Exchange, GossipExchange, PendingExchange
from lightning_gossip.gossip.options import GossipOptions
from lightning_gossip.gossip.schedule import GossipSchedule, StepPlan
from lightning_gossip.gossip.state import GossipState, gossiped_tensors
from lightning_gossip.gossip.topology import TOPOLOGIES, Exponential, RandomPeer, Ring, Topology, resolve_topology

__all__ = [
    "TOPOLOGIES",
    "Exchange",
    "Exponential",
    "GossipAverager",
    "GossipCounters",
    "GossipExchange",
    "GossipOptions",
    "GossipPeerError",
    "GossipSchedule",
    "GossipScheduleError",
    "GossipState",
    "NonFiniteGossipError",
    "PendingExchange",
    "RandomPeer",
    "Ring",
    "StepPlan",
    "Topology",
    "gossiped_tensors",
    "resolve_topology",
]
