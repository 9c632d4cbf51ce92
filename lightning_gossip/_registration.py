"""Registering the strategy names with Lightning, without importing Lightning.

``import lightning_gossip`` must make ``Trainer(strategy="gossip")`` work, yet ``import lightning_gossip.gossip`` (the
plain-torch algorithm, which a hand-written loop uses) must not pay for importing Lightning (seconds) or need it
installed. Python imports a package before any of its submodules, so the package itself cannot import Lightning.

Instead, registration runs when Lightning is there: at once if it is imported already, otherwise right after its
package has finished importing (an import hook on ``sys.meta_path`` that lets the normal finders find the module and
runs the registration after the module's own code). Every ``Trainer`` or ``Fabric`` is made after its package has
finished importing, so the names are always registered before anyone looks them up.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Callable, Optional

Registration = Callable[[], None]


def _import_registering_module(name: str) -> Registration:
    """A registration that imports ``name``, a module that registers its strategies when it is imported.

    If that module is the one importing Lightning right now (e.g. ``lightning_gossip.GossipStrategy`` used first),
    it is in ``sys.modules`` but not finished: it registers itself when it is, so nothing is done here.
    """

    def register() -> None:
        if name not in sys.modules:
            importlib.import_module(name)

    return register


# package -> what to register once it is fully imported
_REGISTRATIONS: dict[str, list[Registration]] = {
    "lightning.pytorch": [_import_registering_module("lightning_gossip.strategy")],
    "lightning.fabric": [_import_registering_module("lightning_gossip.fabric")],
    # the standalone packages (lightning_gossip.standalone renames the adapter modules for them)
    "pytorch_lightning": [_import_registering_module("lightning_gossip.standalone.strategy")],
    "lightning_fabric": [_import_registering_module("lightning_gossip.standalone.fabric")],
}


class _AfterImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a watched module it wraps the real loader so registration runs after its code."""

    def find_spec(
        self, fullname: str, path: Optional[Sequence[str]], target: Optional[ModuleType] = None
    ) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname not in _REGISTRATIONS and not fullname.startswith(_OWN_PREFIX):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, fullname)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    """The real loader, plus the registrations of ``name`` once the module's code has run.

    Registering imports the adapter modules (``lightning_gossip.strategy`` and what it imports). If Lightning is
    imported by one of this package's own modules (``import lightning_gossip.checkpoint_io`` first, say), that module
    is not finished yet, and importing the adapters now would meet it half-built: the registration then waits until
    no module of this package is being imported any more.
    """

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Optional[ModuleType]:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        global _OWN_MODULES_IN_PROGRESS
        # The module must point at its real loader (importlib.resources, linecache and pickle look there).
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        own = self._name.startswith(_OWN_PREFIX)
        _OWN_MODULES_IN_PROGRESS += own
        try:
            self._loader.exec_module(module)
        finally:
            _OWN_MODULES_IN_PROGRESS -= own
        if self._name in _REGISTRATIONS:
            _DUE.extend(_REGISTRATIONS.pop(self._name))
        _run_due()

    def __getattr__(self, name: str) -> object:
        return getattr(self._loader, name)


_OWN_PREFIX = "lightning_gossip."
# How many of this package's modules are being executed right now (through the hook).
_OWN_MODULES_IN_PROGRESS = 0
# Registrations whose Lightning package is imported, waiting for this package's modules to finish importing.
_DUE: list[Registration] = []


def _run_due() -> None:
    if _OWN_MODULES_IN_PROGRESS:
        return
    while _DUE:
        _DUE.pop(0)()
    if not _REGISTRATIONS:
        _uninstall()


_HOOK = _AfterImportHook()


def _uninstall() -> None:
    if _HOOK in sys.meta_path:
        sys.meta_path.remove(_HOOK)


def install() -> None:
    """Register now for every watched package already imported; watch for the others."""
    for package in list(_REGISTRATIONS):
        if package in sys.modules:
            _DUE.extend(_REGISTRATIONS.pop(package))
    if _REGISTRATIONS and _HOOK not in sys.meta_path:
        sys.meta_path.insert(0, _HOOK)
    _run_due()
