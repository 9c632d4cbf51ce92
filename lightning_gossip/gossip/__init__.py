"""The GoSGD algorithm in plain torch / torch.distributed; nothing here imports Lightning or Hydra."""

from lightning_gossip.gossip.averager import GossipAverager
from lightning_gossip.gossip.errors import GossipPeerError
from lightning_gossip.gossip.exchange import GossipCounters, GossipExchange, GossipScheduleError, NonFiniteGossipError
from lightning_gossip.gossip.schedule import GossipSchedule, StepPlan
from lightning_gossip.gossip.state import GossipState, gossiped_tensors
from lightning_gossip.gossip.topology import TOPOLOGIES, Exponential, RandomPeer, Ring, Topology, resolve_topology

__all__ = [
    "TOPOLOGIES",
    "Exponential",
    "GossipAverager",
    "GossipCounters",
    "GossipExchange",
    "GossipPeerError",
    "GossipSchedule",
    "GossipScheduleError",
    "GossipState",
    "NonFiniteGossipError",
    "RandomPeer",
    "Ring",
    "StepPlan",
    "Topology",
    "gossiped_tensors",
    "resolve_topology",
]
