"""What to benchmark: the user's LightningModule and datamodule, named by an import path or a Hydra ``_target_``.

Accepted forms of ``--model`` / ``--datamodule`` (the same for both):

- ``package.module:Class`` or ``package.module.Class``: an import path;
- ``path/to/file.yaml``: a YAML mapping with ``_target_`` and the constructor's arguments (Hydra's format; nested
  ``_target_`` mappings are instantiated too);
- ``'{_target_: package.module.Class, hidden: 64}'``: the same mapping inline.

``--model-arg KEY=VALUE`` (and ``--datamodule-arg``) adds or overrides one argument; the value is read as YAML
(``64`` is an int, ``[1, 2]`` a list, ``null`` None). Building goes through ``hydra.utils.instantiate``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from typing import Any, Optional

import yaml

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*([:.][A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*)$")

# The classes a --model / --datamodule must derive from, by their qualified names in either Lightning package (the
# parent process checks the class without importing the standalone package).
MODULE_BASES = {"lightning.pytorch.core.module.LightningModule", "pytorch_lightning.core.module.LightningModule"}
DATAMODULE_BASES = {"lightning.pytorch.core.datamodule.LightningDataModule",
                    "pytorch_lightning.core.datamodule.LightningDataModule"}


class SpecError(ValueError):
    """A --model / --datamodule that cannot be used; the message names the option, the value and what is expected."""


def parse_value(text: str) -> Any:
    """``KEY=VALUE``'s value, read as YAML (so numbers, booleans, lists and ``null`` keep their types)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_assignments(items: Optional[list[str]], option: str) -> dict[str, Any]:
    """``["hidden=64", "lr=0.1"]`` -> ``{"hidden": 64, "lr": 0.1}``; a malformed item names the option."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"{option} {item!r}: expected KEY=VALUE (for example {option} hidden=64)")
        out[key.strip()] = parse_value(value)
    return out


def parse_spec(value: Any, option: str) -> dict[str, Any]:
    """A spec (import path, YAML file, inline YAML, or an already-parsed mapping) -> ``{"_target_": ..., **kwargs}``."""
    if isinstance(value, dict):
        spec = dict(value)
    elif not isinstance(value, str) or not value.strip():
        raise SpecError(f"{option}: expected an import path (package.module:Class), a YAML file or an inline "
                        f"mapping with _target_, got {value!r}")
    else:
        text = value.strip()
        if text.endswith((".yaml", ".yml")):
            if not os.path.isfile(text):
                raise SpecError(f"{option} {text!r}: no such file")
            with open(text) as f:
                spec = yaml.safe_load(f)
            if not isinstance(spec, dict):
                raise SpecError(f"{option} {text!r}: the file must hold a mapping with _target_, not "
                                f"{type(spec).__name__}")
        elif text.startswith("{"):
            try:
                spec = yaml.safe_load(text)
            except yaml.YAMLError as error:
                raise SpecError(f"{option} {text!r}: not a YAML mapping ({error})") from None
            if not isinstance(spec, dict):
                raise SpecError(f"{option} {text!r}: expected a mapping with _target_")
        elif _IMPORT_PATH.match(text):
            spec = {"_target_": text}
        else:
            raise SpecError(f"{option} {text!r}: expected package.module:Class, a .yaml file or '{{_target_: ...}}'")
    target = spec.get("_target_")
    if not isinstance(target, str) or not _IMPORT_PATH.match(target):
        raise SpecError(f"{option}: the mapping needs _target_: package.module.Class (an import path), got "
                        f"{target!r}")
    spec["_target_"] = target.replace(":", ".")
    return spec


def _split(target: str) -> list[tuple[str, str]]:
    """Candidate (module, attribute path) splits of ``a.b.C.D``, longest module first."""
    parts = target.split(".")
    return [(".".join(parts[:i]), ".".join(parts[i:])) for i in range(len(parts) - 1, 0, -1)]


def locate(target: str, option: str) -> Any:
    """Import ``target`` (``package.module.Class``); a missing module or attribute is a :class:`SpecError`."""
    errors = []
    for module_name, attr in _split(target):
        try:
            found = importlib.util.find_spec(module_name)
        except (ImportError, ValueError):
            found = None
        if found is None:
            continue
        try:
            obj: Any = importlib.import_module(module_name)
        except Exception as error:  # the user's module raised while importing: say so, with its error
            raise SpecError(f"{option} {target!r}: importing {module_name!r} failed: "
                            f"{type(error).__name__}: {error}") from error
        try:
            for name in attr.split("."):
                obj = getattr(obj, name)
        except AttributeError:
            errors.append(f"module {module_name!r} has no attribute {attr!r}")
            continue
        return obj
    why = "; ".join(errors) or "no module of that name can be found on sys.path (is the package installed, or its " \
                              "folder on PYTHONPATH / the current directory?)"
    raise SpecError(f"{option} {target!r}: cannot import it: {why}")


def check_target(spec: dict[str, Any], option: str, bases: set[str], kind: str) -> None:
    """Import the spec's target and check it is a subclass of one of ``bases`` (or a callable that may return one)."""
    obj = locate(spec["_target_"], option)
    if isinstance(obj, type):
        names = {f"{c.__module__}.{c.__qualname__}" for c in obj.__mro__}
        if not names & bases:
            raise SpecError(f"{option} {spec['_target_']!r} is a {obj.__module__}.{obj.__qualname__}, which is not a "
                            f"{kind}")
    elif not callable(obj):
        raise SpecError(f"{option} {spec['_target_']!r} is not a class or a callable")


def instantiate(spec: dict[str, Any]) -> Any:
    """Build the object (Hydra's instantiate: nested ``_target_`` mappings are built too)."""
    from hydra.utils import instantiate as hydra_instantiate

    return hydra_instantiate(spec, _convert_="all")


def describe(spec: Optional[dict[str, Any]]) -> Optional[str]:
    if spec is None:
        return None
    args = ", ".join(f"{k}={v!r}" for k, v in spec.items() if k != "_target_")
    return f"{spec['_target_']}({args})"
