"""Every private Lightning name lightning-gossip relies on, in one place.

Lightning has no public seam for some of what gossip needs (the per-step SIGTERM broadcast, the launchers, the
observer of child processes). Each private name is imported or looked up here and nowhere else, and
``tests/lightning/test_lightning_compat.py`` checks each one, so a Lightning release that renames or changes one fails
loudly in the tests (and, for the SIGTERM throttle, at setup) instead of silently changing behaviour.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning_utilities.core.imports import compare_version

import lightning.pytorch as pl

# Lightning broadcasts rank 0's SIGTERM flag before every training step (`_TrainingEpochLoop.advance`); every release
# since 2.6 has it (some 2.5.x releases too, which the throttle handles the same way when the method is there).
SIGTERM_BROADCAST_METHOD = "_broadcast_sigterm_tensor"
LIGHTNING_BROADCASTS_SIGTERM = compare_version("lightning", lambda a, b: a >= b, "2.6.0")

__all__ = [
    "LIGHTNING_BROADCASTS_SIGTERM",
    "SIGTERM_BROADCAST_METHOD",
    "_ChildProcessObserver",
    "_MultiProcessingLauncher",
    "_SubprocessScriptLauncher",
    "_get_sigkill_signal",
    "_is_local_file_protocol",
    "make_sigterm_handler_local",
    "throttle_sigterm_broadcast",
]


def throttle_sigterm_broadcast(trainer: pl.Trainer, should_broadcast: Callable[[], bool]) -> Any:
    """Make the fit loop run Lightning's per-step SIGTERM broadcast only when ``should_broadcast()`` says so.

    Returns the replacement (its ``broadcasts`` attribute counts the broadcasts run), or ``None`` on a Lightning that
    has no per-step broadcast. Raises if this Lightning should have the broadcast but it is not where it was: the
    throttle must never switch itself off silently.
    """
    loop = trainer.fit_loop.epoch_loop
    original = getattr(type(loop), SIGTERM_BROADCAST_METHOD, None)
    if original is None:
        if LIGHTNING_BROADCASTS_SIGTERM or not isinstance(loop, _TrainingEpochLoop):
            raise RuntimeError(
                f"lightning-gossip throttles Lightning's per-step SIGTERM broadcast "
                f"(`{_TrainingEpochLoop.__name__}.{SIGTERM_BROADCAST_METHOD}`), which this Lightning version does not "
                "have where expected. Please report this with your Lightning version; meanwhile pin lightning<2.7."
            )
        return None

    def throttled() -> None:
        if should_broadcast():
            throttled.broadcasts += 1  # type: ignore[attr-defined]
            original(loop)

    throttled.broadcasts = 0  # type: ignore[attr-defined]
    setattr(loop, SIGTERM_BROADCAST_METHOD, throttled)
    return throttled


def make_sigterm_handler_local(trainer: pl.Trainer) -> None:
    """Make Lightning's SIGTERM handler raise the flag only, with no collective in it.

    Lightning's handler (``_SignalConnector._sigterm_notifier_fn``) runs ``dist.broadcast`` inside the signal handler,
    that is between any two Python bytecodes of the main thread: inside a checkpoint save's collectives, a gossip
    exchange, a barrier. A SIGTERM to every rank (a scheduler's preemption notice) then deadlocks until the
    process-group timeout: rank 0 waits in the save's collective, the others in the handler's broadcast. Here the
    handler only stops the processes this one launched (as Lightning's does) and sets ``trainer.received_sigterm``;
    each rank stops at its next step boundary (Lightning checks the flag there), and rank 0's flag still reaches
    the others through the fit loop's (throttled) per-step broadcast, a matched collective. Must run before
    ``register_signal_handlers`` (the strategy's ``setup_environment`` does).
    """
    connector = trainer._signal_connector
    log = logging.getLogger("lightning.pytorch.trainer.connectors.signal_connector")

    def sigterm_notifier(signum: Any, frame: Any) -> None:
        log.info(f"[rank: {trainer.global_rank}] Received SIGTERM: {signum}; stopping at the next step boundary")
        if not connector.received_sigterm:
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        connector.received_sigterm = True

    connector._sigterm_notifier_fn = sigterm_notifier
