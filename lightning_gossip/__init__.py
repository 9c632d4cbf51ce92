"""lightning-gossip: GoSGD gossip training as a PyTorch Lightning strategy.

Importing the package registers the strategy names ``"gossip"``, ``"gossip_spawn"`` and ``"gossip_fork"`` in
Lightning's strategy registries, so ``Trainer(strategy="gossip")`` and ``Fabric(strategy="gossip")`` work (also with the
standalone ``pytorch_lightning`` / ``lightning_fabric`` packages: :mod:`lightning_gossip.standalone`). It does not
import Lightning itself: the names are registered as soon as Lightning is imported (see
:mod:`lightning_gossip._registration`), and the Lightning classes below are imported when first used, so
``import lightning_gossip.gossip`` (the plain-torch algorithm) stays free of Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lightning_gossip import _registration
from lightning_gossip.gossip import (
    TOPOLOGIES,
    Exponential,
    GossipAverager,
    GossipCounters,
    GossipOptions,
    GossipPeerError,
    GossipScheduleError,
    NonFiniteGossipError,
    RandomPeer,
    Ring,
    Topology,
)

if TYPE_CHECKING:
    from lightning_gossip.callbacks import GossipMonitor
    from lightning_gossip.fabric import GossipFabricStrategy
    from lightning_gossip.strategy import GossipStrategy

__version__ = "0.1.0"

# public name -> the module that defines it; imported on first access (these modules import Lightning)
_LIGHTNING_NAMES = {
    "GossipStrategy": "lightning_gossip.strategy",
    "GossipMonitor": "lightning_gossip.callbacks",
    "GossipFabricStrategy": "lightning_gossip.fabric",
}


def __getattr__(name: str) -> Any:
    module = _LIGHTNING_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LIGHTNING_NAMES))


_registration.install()

__all__ = [
    "TOPOLOGIES",
    "Exponential",
    "GossipAverager",
    "GossipCounters",
    "GossipFabricStrategy",
    "GossipMonitor",
    "GossipOptions",
    "GossipPeerError",
    "GossipScheduleError",
    "GossipStrategy",
    "NonFiniteGossipError",
    "RandomPeer",
    "Ring",
    "Topology",
    "__version__",
]
