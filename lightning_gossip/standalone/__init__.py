"""lightning-gossip for the standalone ``pytorch_lightning`` package (``import pytorch_lightning as pl``).

``pytorch_lightning`` and the unified ``lightning`` package hold the same code under two names: Lightning builds
``pytorch_lightning`` (and ``lightning_fabric``) from the sources of ``lightning.pytorch`` (and
``lightning.fabric``) by renaming the imports. Their classes are distinct, though: ``pytorch_lightning.Trainer``
accepts only strategies derived from ``pytorch_lightning.strategies.Strategy``, so the ``GossipStrategy`` built on
``lightning.pytorch`` is rejected there.

This package applies that same renaming to the Lightning adapter modules of lightning_gossip (the strategies, the
adapter core, the modes, callbacks, launchers, checkpoint code and Lightning compatibility layer), when they are imported as
``lightning_gossip.standalone.<module>``. There is no second copy of any logic: the adapter source is read from
``lightning_gossip/<module>.py`` and compiled under the new name with its original file name and line numbers, so
tracebacks point at the real file; the algorithm (:mod:`lightning_gossip.gossip`, plain torch) is shared as it is.

``import lightning_gossip`` registers ``"gossip"``, ``"gossip_spawn"`` and ``"gossip_fork"`` in ``pytorch_lightning``'s
``StrategyRegistry`` (and ``lightning_fabric``'s) as soon as that package is imported, and the classes are here::

    import lightning_gossip
    import pytorch_lightning as pl
    from lightning_gossip.standalone import GossipStrategy

    trainer = pl.Trainer(accelerator="cpu", devices=4, strategy="gossip")          # or GossipStrategy(p=0.1)

``lightning_fabric`` (which the ``pytorch_lightning`` package ships) gets ``GossipFabricStrategy`` the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import re
import sys
from typing import Any, Optional, Sequence

# The modules of lightning_gossip that import Lightning, or import a module that does (the adapter core imports the
# checkpoint code): the adapter layer. Everything else (lightning_gossip.gossip, the algorithm) imports no Lightning
# and is shared unchanged; a standalone run imports no module of the unified package. A module named here that does
# not exist (yet) is skipped.
ADAPTER_MODULES = (
    "strategy",
    "callbacks",
    "launchers",
    "checkpoint_io",
    "_lightning_compat",
    "fabric",
    "modes",
    "trainer_modes",
    "_adapter",
)

# Lightning's own renaming (lightning.pytorch -> pytorch_lightning, lightning.fabric -> lightning_fabric) and ours.
_RENAMES = (
    (re.compile(r"\blightning\.pytorch\b"), "pytorch_lightning"),
    (re.compile(r"\blightning\.fabric\b"), "lightning_fabric"),
    # version checks of the unified package (``compare_version("lightning", ...)``) ask about pytorch_lightning's
    (re.compile(r"compare_version\(\s*([\"'])lightning\1"), 'compare_version("pytorch_lightning"'),
    (re.compile(r"\blightning_gossip\.(" + "|".join(re.escape(m) for m in ADAPTER_MODULES) + r")\b"),
     __name__ + r".\1"),
)
# What must not survive the renaming: any other use of the unified package would mix the two class hierarchies.
_LEFTOVER = re.compile(r"^\s*(?:import|from)\s+lightning(?:\s|\.|$)|\bimport\s+lightning\s+as\b", re.MULTILINE)


def translate(source: str, origin: str = "<source>") -> str:
    """The adapter source with Lightning's renaming applied; raises if it still imports the unified package."""
    for pattern, replacement in _RENAMES:
        source = pattern.sub(replacement, source)
    leftover = _LEFTOVER.search(source)
    if leftover:
        line = source.count("\n", 0, leftover.start()) + 1
        raise ImportError(
            f"{origin}:{line} imports the unified `lightning` package in a way lightning_gossip.standalone cannot "
            f"rename for pytorch_lightning ({leftover.group(0).strip()!r}); import from `lightning.pytorch` or "
            "`lightning.fabric` instead."
        )
    return source


class _RenamedAdapterLoader(importlib.abc.Loader):
    def __init__(self, origin: str) -> None:
        self.origin = origin

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None  # the default module object

    def exec_module(self, module: Any) -> None:
        with open(self.origin, encoding="utf-8") as f:
            source = translate(f.read(), self.origin)
        module.__file__ = self.origin
        exec(compile(source, self.origin, "exec"), module.__dict__)


class _RenamedAdapterFinder(importlib.abc.MetaPathFinder):
    """Finds ``lightning_gossip.standalone.<adapter>`` in ``lightning_gossip/<adapter>.py``."""

    def find_spec(self, fullname: str, path: Optional[Sequence[str]] = None,
                  target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        prefix, _, name = fullname.rpartition(".")
        if prefix != __name__ or name not in ADAPTER_MODULES:
            return None
        original = importlib.util.find_spec(f"lightning_gossip.{name}")
        if original is None or not original.origin or not original.origin.endswith(".py"):
            return None
        return importlib.util.spec_from_loader(fullname, _RenamedAdapterLoader(original.origin),
                                               origin=original.origin)


if not any(isinstance(finder, _RenamedAdapterFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RenamedAdapterFinder())

# public name -> the renamed module that defines it; imported on first access. Importing a renamed module registers
# its names in the standalone package's registry (``pytorch_lightning``'s StrategyRegistry, ``lightning_fabric``'s
# STRATEGY_REGISTRY), which lightning_gossip/_registration.py also does as soon as that package is imported.
_NAMES = {
    "GossipStrategy": f"{__name__}.strategy",
    "GossipMonitor": f"{__name__}.callbacks",
    "GossipFabricStrategy": f"{__name__}.fabric",
}


def __getattr__(name: str) -> Any:
    module = _NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = ["ADAPTER_MODULES", "GossipFabricStrategy", "GossipMonitor", "GossipStrategy", "translate"]
