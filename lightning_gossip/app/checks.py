"""Up-front checks of a composed config: a wrong value is refused in the Hydra process, before any worker starts.

The configs have no schema of their own (every group is a plain ``_target_`` mapping that users extend), so the keys
that would otherwise fail late (inside the workers, often as a bare ``AssertionError`` from deep in Lightning) are
checked here by type and range, each error naming the key, the value and what is allowed. With asynchronous gossip,
the settings that mode cannot run with are refused here too (:func:`check_asynchronous`). Objects that check their
own arguments when they are built (the strategy, the Trainer) are built once in the Hydra process anyway.
"""

from __future__ import annotations

import os
import zipfile
from numbers import Real
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value of the wrong type or out of range (named by its full key)."""


# checkers: value -> True when allowed
def _int(minimum: Optional[int] = None, none: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if v is None:
            return none
        return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)

    return check


def _number(minimum: float = 0.0, none: bool = False) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if v is None:
            return none
        return isinstance(v, Real) and not isinstance(v, bool) and v == v and v >= minimum

    return check


def _bool(v: Any) -> bool:
    return isinstance(v, bool)


def _batches(v: Any) -> bool:
    """Lightning's limit_*_batches: an int >= 0 (batches), a float in [0, 1] (fraction) or null."""
    if v is None:
        return True
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 0
    return isinstance(v, float) and 0.0 <= v <= 1.0


def _devices(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    if isinstance(v, int):
        return v >= 1 or v == -1
    if isinstance(v, str):
        return v == "auto" or v.lstrip("-").isdigit() or all(p.strip().isdigit() for p in v.split(",") if p.strip())
    if OmegaConf.is_list(v) or isinstance(v, (list, tuple)):
        return len(v) > 0 and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    return False


def _deterministic(v: Any) -> bool:
    return v is None or isinstance(v, bool) or v == "warn"


# (key, checker, what is allowed)
_CHECKS: list[tuple[str, Callable[[Any], bool], str]] = [
    ("seed", _int(none=True), "an integer or null"),
    ("threads_per_worker", _int(1, none=True), "an integer >= 1 or null"),
    ("test", _bool, "true or false"),
    ("max_restarts", _int(0, none=True), "an integer >= 0"),
    ("shutdown_timeout", _number(1.0, none=True), "a number of seconds >= 1"),
    ("trainer.max_epochs", _int(-1, none=True), "an integer >= -1 (-1: no limit) or null"),
    ("trainer.min_epochs", _int(0, none=True), "an integer >= 0 or null"),
    ("trainer.max_steps", _int(-1, none=True), "an integer >= -1 (-1: no limit)"),
    ("trainer.min_steps", _int(0, none=True), "an integer >= 0 or null"),
    ("trainer.devices", _devices, "an integer >= 1, -1, 'auto' or a list of device indices"),
    ("trainer.num_nodes", _int(1), "an integer >= 1"),
    ("trainer.limit_train_batches", _batches, "an integer >= 0 (batches), a float in [0, 1] or null"),
    ("trainer.limit_val_batches", _batches, "an integer >= 0 (batches), a float in [0, 1] or null"),
    ("trainer.limit_test_batches", _batches, "an integer >= 0 (batches), a float in [0, 1] or null"),
    ("trainer.check_val_every_n_epoch", _int(1, none=True), "an integer >= 1 or null"),
    ("trainer.log_every_n_steps", _int(1, none=True), "an integer >= 1 or null"),
    ("trainer.accumulate_grad_batches", _int(1), "an integer >= 1"),
    ("trainer.num_sanity_val_steps", _int(-1, none=True), "an integer >= -1 or null"),
    ("trainer.gradient_clip_val", _number(0.0, none=True), "a number >= 0 or null"),
    ("trainer.deterministic", _deterministic, "true, false, 'warn' or null"),
    ("trainer.use_distributed_sampler", _bool, "true or false"),
    ("trainer.enable_progress_bar", _bool, "true or false"),
    ("trainer.enable_model_summary", _bool, "true or false"),
    ("data.batch_size", _int(1), "an integer >= 1"),
    ("data.num_workers", _int(0), "an integer >= 0"),
]
# GossipStrategy's switches: a string such as "false" would be truthy
_GOSSIP_BOOLS = ("mix_buffers", "overlap", "final_consensus", "monitor", "asynchronous", "outer_nesterov")

# ckpt_path values Lightning resolves itself
_CKPT_KEYWORDS = ("last", "best", "hpc")


def _describe(value: Any) -> str:
    if OmegaConf.is_config(value):
        value = OmegaConf.to_container(value)
    return f"{value!r} ({type(value).__name__})" if value is not None else "null"


_MISSING = object()


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)


def check_config(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value of a wrong type or out of range, and check ``ckpt_path``."""
    problems = []
    for key, allowed, what in _CHECKS:
        value = _select(cfg, key)
        if value is _MISSING:
            continue
        if not allowed(value):
            problems.append(f"{key} must be {what}, got {_describe(value)}")
    strategy = cfg.get("strategy")
    if _is_gossip(strategy):
        for name in _GOSSIP_BOOLS:
            value = strategy.get(name, _MISSING)
            if value is not _MISSING and not _bool(value):
                problems.append(f"strategy.{name} must be true or false, got {_describe(value)}")
    if problems:
        raise ConfigError("Invalid config (nothing was started): " + "; ".join(problems) + ".")
    check_asynchronous(cfg)
    check_checkpoint_path(cfg.get("ckpt_path"))


def _is_gossip(strategy: Any) -> bool:
    return isinstance(strategy, DictConfig) and "GossipStrategy" in str(strategy.get("_target_", ""))


def is_asynchronous(cfg: DictConfig) -> bool:
    """Whether the config trains with asynchronous gossip (``strategy=gossip_async`` or ``strategy.asynchronous``)."""
    strategy = cfg.get("strategy")
    return _is_gossip(strategy) and strategy.get("asynchronous") is True


_ASYNCHRONOUS_WHY = (
    "asynchronous gossip lets ranks take different numbers of optimizer steps within an epoch, so nothing may need "
    "every rank at the same training step"
)


def check_asynchronous(cfg: DictConfig) -> None:
    """Refuse, before any worker starts, what the asynchronous mode cannot do (``GossipStrategy`` refuses the same
    Trainer settings at setup, in every worker; here the error names the config keys and nothing is started).

    ``data.split=label_skew`` is refused while the training data is shared out (``trainer.use_distributed_sampler``,
    which follows ``strategy.asynchronous``): work sharing hands every rank chunks of one permutation of the whole
    training set, whoever asks first, so every rank would see the same label mix and the skew asked for would be
    gone without a word. ``trainer.use_distributed_sampler=false`` keeps each rank's skewed part (equal static shards;
    the exchange stays asynchronous, but the epoch then ends at the slowest rank's pace); that choice is the user's.
    """
    if not is_asynchronous(cfg):
        return
    problems = []
    max_steps = _select(cfg, "trainer.max_steps")
    if max_steps not in (_MISSING, None, -1):
        problems.append(f"trainer.max_steps={max_steps}: ranks count their own steps, so they would stop at "
                        "different points of an epoch with data left unused; use trainer.max_epochs or "
                        "trainer.max_time")
    min_steps = _select(cfg, "trainer.min_steps")
    if min_steps not in (_MISSING, None, 0):
        problems.append(f"trainer.min_steps={min_steps}: use trainer.min_epochs")
    interval = _select(cfg, "trainer.val_check_interval")
    if interval is not _MISSING and interval is not None and (
            isinstance(interval, int) and not isinstance(interval, bool)
            or isinstance(interval, float) and interval != 1.0):
        problems.append(f"trainer.val_check_interval={interval}: validation inside an epoch needs every rank at the "
                        "same step; validate at the end of epochs (1.0, with trainer.check_val_every_n_epoch=N)")
    if _select(cfg, "trainer.check_val_every_n_epoch") is None:
        problems.append("trainer.check_val_every_n_epoch=null validates every N training batches; use an integer")
    for name, callback in (cfg.get("callbacks") or {}).items():
        if isinstance(callback, DictConfig) and "ModelCheckpoint" in str(callback.get("_target_", "")) and (
                callback.get("every_n_train_steps") or callback.get("train_time_interval") is not None):
            problems.append(f"callbacks.{name} saves inside an epoch (every_n_train_steps/train_time_interval), "
                            "which needs every rank at the same step; use every_n_epochs (the default)")
    why = f" Why: {_ASYNCHRONOUS_WHY}." if problems else ""  # the step-related ones above; the data ones say why
    if _select(cfg, "trainer.use_distributed_sampler") is True:
        limit = _select(cfg, "trainer.limit_train_batches")
        if isinstance(limit, float) and limit != 1.0:
            problems.append(f"trainer.limit_train_batches={limit}: the training data is shared out between the ranks "
                            "as they ask for it, so a rank's share has no length to take a fraction of; give a "
                            "number of batches per rank (an integer) or 1.0")
        if _select(cfg, "data.split") == "label_skew":
            problems.append("data.split=label_skew: the training data is shared out dynamically (every rank takes "
                            "chunks of one permutation of the whole training set), which would erase the skew; use "
                            "data.split=iid, or keep each rank's skewed part with "
                            "trainer.use_distributed_sampler=false (no work sharing: the epoch ends at the slowest "
                            "rank's pace)")
    if problems:
        raise ConfigError("Invalid config for asynchronous gossip (strategy.asynchronous=true; nothing was started): "
                          + "; ".join(problems) + "." + why)


def check_checkpoint_path(ckpt_path: Any) -> None:
    """A checkpoint to resume from must exist and be a whole torch checkpoint (zip) file; named in every error."""
    if ckpt_path is None or ckpt_path in _CKPT_KEYWORDS:
        return
    if not isinstance(ckpt_path, str):
        raise ConfigError(f"ckpt_path must be a file path, 'last', 'best' or null, got {_describe(ckpt_path)}.")
    if "://" in ckpt_path:
        return  # a remote filesystem (fsspec): Lightning reads it and names it
    path = Path(ckpt_path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"ckpt_path {ckpt_path} does not exist (resolved from {os.getcwd()}: "
                                f"{path.resolve()}); nothing was started.")
    if path.is_dir():
        raise ConfigError(f"ckpt_path {ckpt_path} is a directory; give the checkpoint file (e.g. "
                          f"{path / 'last.ckpt'}).")
    # torch.save writes a zip archive whose directory is at the end: a file cut short (a copy or a save that did not
    # finish, a full disk) has none. Reading the directory costs one seek, whatever the file's size.
    try:
        with zipfile.ZipFile(path) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as err:
        raise ConfigError(f"ckpt_path {path} is not a readable checkpoint ({path.stat().st_size} bytes: truncated "
                          f"or not written by torch.save; {err}).") from None


def register_resolvers() -> None:
    """``${pid:}``: this process's id, which keeps the folders of runs started in the same second apart."""
    if not OmegaConf.has_resolver("pid"):
        OmegaConf.register_new_resolver("pid", lambda: os.getpid(), use_cache=True)


def check_data(cfg: DictConfig) -> None:
    """The datamodule's own cheap checks (``check()``: a local dataset path exists, ...)."""
    from hydra.utils import instantiate

    check = getattr(instantiate(cfg.data), "check", None)
    if callable(check):
        check()
