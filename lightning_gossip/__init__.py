"""lightning-gossip: GoSGD gossip training as a PyTorch Lightning strategy.

Importing the package registers the strategy names ``"gossip"``, ``"gossip_spawn"`` and ``"gossip_fork"`` in
Lightning's strategy registry, so ``Trainer(strategy="gossip")`` works.
"""

from lightning.pytorch.strategies import StrategyRegistry

from lightning_gossip.callbacks import GossipMonitor
from lightning_gossip.gossip import (
    TOPOLOGIES,
    Exponential,
    GossipAverager,
    GossipCounters,
    GossipPeerError,
    GossipScheduleError,
    NonFiniteGossipError,
    RandomPeer,
    Ring,
    Topology,
)
from lightning_gossip.strategy import GossipStrategy

__version__ = "0.1.0"

if "gossip" not in StrategyRegistry:
    GossipStrategy.register_strategies(StrategyRegistry)

__all__ = [
    "TOPOLOGIES",
    "Exponential",
    "GossipAverager",
    "GossipCounters",
    "GossipMonitor",
    "GossipPeerError",
    "GossipScheduleError",
    "GossipStrategy",
    "NonFiniteGossipError",
    "RandomPeer",
    "Ring",
    "Topology",
    "__version__",
]
