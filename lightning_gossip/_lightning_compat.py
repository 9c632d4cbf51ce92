"""Every private Lightning name lightning-gossip relies on, and every patch of a Lightning object, in one place.

Lightning has no public seam for some of what gossip needs (the per-step SIGTERM broadcast, the launchers, the
observer of child processes, the dataloader rebuild, a fit loop that must not stop at an estimated length). Each
private name is imported here and nowhere else, each patch is a function here, and
``tests/lightning/test_lightning_compat.py`` checks each one on the newest and on the lowest Lightning that
``pyproject.toml`` allows, so a release that renames or changes one fails loudly in the tests instead of a feature
silently turning itself off.

Only ``lightning.fabric`` is imported when this module is: the Fabric adapter uses it, and Fabric users must not pay
for (or, while ``lightning.pytorch`` is still importing, meet half-built) the Trainer side. The Trainer side's names
are imported where they are used, or on first access through the module's ``__getattr__``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.data import _update_dataloader
from lightning_utilities.core.imports import compare_version

if TYPE_CHECKING:
    import lightning.pytorch as pl

# Lightning broadcasts rank 0's SIGTERM flag before every training step (`_TrainingEpochLoop.advance`); every release
# since 2.6 has it (some 2.5.x releases too, which the throttle handles the same way when the method is there).
SIGTERM_BROADCAST_METHOD = "_broadcast_sigterm_tensor"
LIGHTNING_BROADCASTS_SIGTERM = compare_version("lightning", lambda a, b: a >= b, "2.6.0")

__all__ = [
    "LIGHTNING_BROADCASTS_SIGTERM",
    "agree_on_checkpoint_step",
    "SIGTERM_BROADCAST_METHOD",
    "_ChildProcessObserver",
    "_is_local_file_protocol",
    "checkpoint_saves_within_epoch",
    "expect_batches_per_epoch",
    "last_batch_of_epoch",
    "make_sigterm_handler_local",
    "replace_sigterm_broadcast",
    "replace_sigterm_notifier",
    "signal_connector",
    "silence_timer_broadcast",
    "timer_duration",
    "update_dataloader",
    "uses_distributed_sampler",
]


def __getattr__(name: str) -> Any:
    """The Trainer side's private classes and functions, imported on first access (see the module docstring)."""
    if name in ("_MultiProcessingLauncher", "_SubprocessScriptLauncher"):
        from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher

        value = {"_MultiProcessingLauncher": _MultiProcessingLauncher,
                 "_SubprocessScriptLauncher": _SubprocessScriptLauncher}[name]
    elif name == "_get_sigkill_signal":
        from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal

        value = _get_sigkill_signal
    elif name == "_TrainingEpochLoop":
        from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

        value = _TrainingEpochLoop
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


# -- data ---------------------------------------------------------------------------------------------------------
def update_dataloader(dataloader: Any, sampler: Any) -> Any:
    """The dataloader rebuilt with ``sampler``, every other argument (and a DataLoader subclass) kept, as Lightning
    and Fabric rebuild it for their own ``DistributedSampler``."""
    return _update_dataloader(dataloader, sampler)


def uses_distributed_sampler(trainer: pl.Trainer) -> bool:
    """``Trainer(use_distributed_sampler=...)``, which the Trainer keeps only on its private connector."""
    return bool(trainer._accelerator_connector.use_distributed_sampler)


def expect_batches_per_epoch(trainer: pl.Trainer, expected: Callable[[], Optional[int]]) -> None:
    """Let Lightning count ``expected()`` training batches per epoch where it cannot know the length, without
    ending an epoch there.

    The asynchronous mode's training dataloader has no length (a rank's share depends on the ranks' speeds), so
    Lightning would report ``trainer.estimated_stepping_batches == -1`` (``OneCycleLR(total_steps=...)`` fails) and the
    progress bar would have no total. After each ``FitLoop.setup_data`` (where Lightning sets the count) an unsized
    count becomes ``expected()``; the epoch loop then decides the end of such an epoch from the data alone (the data
    fetcher's last batch), never from that count. A count the user set (``limit_train_batches=N``,
    ``fast_dev_run``) still ends the epoch as usual.
    """
    fit_loop = trainer.fit_loop
    epoch_loop = fit_loop.epoch_loop
    setup_data = fit_loop.setup_data
    num_ready_batches_reached = epoch_loop._num_ready_batches_reached
    estimated = [False]

    def setup_data_with_expected_count() -> None:
        before = fit_loop.max_batches
        setup_data()
        if fit_loop.max_batches == float("inf"):
            count = expected()
            estimated[0] = count is not None
            if count is not None:
                fit_loop.max_batches = count
        elif fit_loop.max_batches != before:  # Lightning set a count of its own (a limit, a sized loader)
            estimated[0] = False

    def last_batch_reached() -> bool:
        return bool(epoch_loop.batch_progress.is_last_batch) if estimated[0] else num_ready_batches_reached()

    fit_loop.setup_data = setup_data_with_expected_count  # type: ignore[method-assign]
    epoch_loop._num_ready_batches_reached = last_batch_reached  # type: ignore[method-assign]


def last_batch_of_epoch(trainer: pl.Trainer) -> bool:
    """Whether the training batch that just ran is this rank's last of the epoch (Lightning's own test: the data
    ran out, or the batch count was reached), as the epoch loop decides it."""
    return bool(trainer.fit_loop.epoch_loop._num_ready_batches_reached())


# -- callbacks ----------------------------------------------------------------------------------------------------
def checkpoint_saves_within_epoch(callback: Any) -> bool:
    """Whether a ``ModelCheckpoint`` saves every N training steps or every T seconds (inside an epoch)."""
    return bool(callback._every_n_train_steps) or callback._train_time_interval is not None


def timer_duration(timer: Any) -> Optional[float]:
    """A ``Timer``'s ``max_time`` in seconds (``None``: no limit)."""
    return timer._duration


def silence_timer_broadcast(timer: Any) -> None:
    """Drop the ``Timer``'s per-batch broadcast of rank 0's decision (the asynchronous mode's stop flag decides)."""
    timer.on_train_batch_end = lambda *args, **kwargs: None  # type: ignore[method-assign]


# -- SIGTERM ------------------------------------------------------------------------------------------------------
def signal_connector(trainer: pl.Trainer) -> Any:
    """The Trainer's signal connector (``received_sigterm`` and the handler it registers live there)."""
    return trainer._signal_connector


def replace_sigterm_notifier(trainer: pl.Trainer, notifier: Callable[[Any, Any], None]) -> None:
    """Make ``notifier`` the Trainer's SIGTERM handler (read by ``register_signal_handlers``, which runs after the
    strategy's ``setup_environment``)."""
    signal_connector(trainer)._sigterm_notifier_fn = notifier


def replace_sigterm_broadcast(trainer: pl.Trainer, replacement: Callable[[], None]) -> bool:
    """Run ``replacement()`` where Lightning broadcasts rank 0's SIGTERM flag before every step (a collective), if
    this Lightning does; returns whether it does. (Lightning < 2.5 has no such broadcast: nothing to replace.)"""
    loop = trainer.fit_loop.epoch_loop
    if _sigterm_broadcast_of(loop) is None:
        return False
    setattr(loop, SIGTERM_BROADCAST_METHOD, replacement)
    return True


def _sigterm_broadcast_of(loop: Any) -> Optional[Callable[[Any], None]]:
    from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

    original = getattr(type(loop), SIGTERM_BROADCAST_METHOD, None)
    if original is None and (LIGHTNING_BROADCASTS_SIGTERM or not isinstance(loop, _TrainingEpochLoop)):
        raise RuntimeError(
            f"lightning-gossip replaces Lightning's per-step SIGTERM broadcast "
            f"(`{_TrainingEpochLoop.__name__}.{SIGTERM_BROADCAST_METHOD}`), which this Lightning version does not "
            "have where expected. Please report this with your Lightning version; meanwhile pin lightning<2.7."
        )
    return original


def make_sigterm_handler_local(trainer: pl.Trainer) -> None:
    """Make Lightning's SIGTERM handler raise the flag only, with no collective in it.

    Lightning's handler (``_SignalConnector._sigterm_notifier_fn``) runs ``dist.broadcast`` inside the signal handler,
    that is between any two Python bytecodes of the main thread: inside a checkpoint save's collectives, a gossip
    exchange, a barrier. A SIGTERM to every rank (a scheduler's preemption notice) then deadlocks until the
    process-group timeout: rank 0 waits in the save's collective, the others in the handler's broadcast. Here the
    handler only stops the processes this one launched (as Lightning's does) and sets ``trainer.received_sigterm``;
    the rank stops at its next step boundary (Lightning checks the flag there). Used outside fits (validate, test,
    predict) and with ``sigterm_sync_every=None``; a fit replaces it by its mode's handler (the lock-step agreement,
    the asynchronous stop flag). Must run before ``register_signal_handlers`` (the strategy's ``setup_environment``
    does).
    """
    connector = signal_connector(trainer)
    log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")

    def sigterm_notifier(signum: Any, frame: Any) -> None:
        log.info(f"[rank: {trainer.global_rank}] Received SIGTERM: {signum}; stopping at the next step boundary")
        if not connector.received_sigterm:
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        connector.received_sigterm = True

    replace_sigterm_notifier(trainer, sigterm_notifier)


def agree_on_checkpoint_step(callback: Any, step: Callable[[], int]) -> None:
    """Make a ``ModelCheckpoint`` name its files after ``step()`` instead of this rank's ``global_step``.

    Asynchronous ranks count their own optimizer steps, so the default file name (``epoch=0-step=37.ckpt``) would
    differ between ranks, and so would ``best_model_path``: ``trainer.test(ckpt_path="best")`` then fails with
    ``FileNotFoundError`` on every rank but one. Every rank takes rank 0's step, agreed at the epoch's end.
    """
    import torch

    original = callback._monitor_candidates

    def monitor_candidates(trainer: Any) -> dict:
        candidates = original(trainer)
        candidates["step"] = torch.tensor(step())
        return candidates

    callback._monitor_candidates = monitor_candidates
