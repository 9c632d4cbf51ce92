"""The Trainer's side of the gossip modes: what only the Lightning Trainer has (SIGTERM handling, ``max_time``,
callbacks, ``self.log(sync_dist=True)``, LR schedulers stepped per batch), one object per mode.

:class:`TrainerLockStep`: every rank is at the same step before each training step, so Lightning's own per-step
machinery works. Gossip checks, before the first step, that every rank's epoch has as many batches, and replaces
Lightning's per-step SIGTERM broadcast (rank 0's flag, a global sync every step) by an agreement every
``sigterm_sync_every`` steps and at every epoch's end: any rank's SIGTERM (a scheduler's notice to one process or to
all of them, at slightly different moments) stops every rank at the same step, with exit code 143, on every Lightning
version (Lightning < 2.5 has no per-step broadcast at all).

:class:`TrainerAsynchronous`: ranks take different numbers of optimizer steps within an epoch. A collective issued per
training step would then pair step 37 of one rank with step 52 of another, or wait for a rank that has finished its
epoch: a hang or silently wrong results. So, inside an epoch:

* Lightning's per-step SIGTERM broadcast is replaced by a flag in the process group's store: a rank that receives
  SIGTERM raises it, every rank looks at it before each batch (asking the store at most every
  ``STOP_POLL_SECONDS``) and they stop together. ``max_time`` (the Timer broadcasts rank 0's decision after every
  batch) uses a flag too: the first rank out of time ends the epoch's data for all, and training stops at that
  epoch's end.
* Settings that need a collective per step are refused before any worker starts (:meth:`check_before_launch`), and
  a collective through the strategy (``self.log(..., sync_dist=True)``, ``self.all_gather``, a barrier) from any hook
  between an epoch's start and its end raises :class:`~lightning_gossip.modes.AsynchronousModeError` at once.
* The epoch ends where the shared data runs out, the same point for every rank; the ranks meet there
  (:class:`EpochBoundary`) before anything global (the monitor's consensus distance, validation on the consensus,
  epoch-level logging, EarlyStopping, checkpoints), all of which work as usual after it.
* Lightning is given the expected number of batches per epoch (the epoch's batches over all ranks divided by the
  number of ranks), so ``trainer.estimated_stepping_batches`` and the progress bar's total are there, and LR
  schedulers stepped per batch follow the epoch's *global* progress (the batches all ranks have taken, divided by
  the number of ranks), so every rank's schedule is where the whole run is, and none steps past the estimate.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gossip._lightning_compat import (
    agree_on_checkpoint_step,
    checkpoint_saves_within_epoch,
    expect_batches_per_epoch,
    last_batch_of_epoch,
    replace_sigterm_broadcast,
    replace_sigterm_notifier,
    signal_connector,
    silence_timer_broadcast,
    timer_duration,
    uses_distributed_sampler,
)
from lightning_gossip.gossip.errors import GossipScheduleError, peer_lost_error
from lightning_gossip.gossip.errors import store as gossip_store
from lightning_gossip.modes import WHY_NO_STEP_COLLECTIVES, Asynchronous, AsynchronousModeError, LockStep

if TYPE_CHECKING:
    import lightning.pytorch as pl

STOP_POLL_SECONDS = 0.2


class TrainerLockStep(LockStep):
    """Lock-step gossip under the Trainer."""

    sigterm: Optional[SigtermAgreement] = None

    def check_before_launch(self, trainer: pl.Trainer) -> None:
        """Refuse, before any worker starts, what this mode cannot do (lock-step: nothing)."""

    def setup_fit(self, strategy: Any, trainer: pl.Trainer) -> None:
        """At the setup of a fit, once the averager exists: the SIGTERM agreement in place of Lightning's per-step
        broadcast (``sigterm_sync_every=None``: none; each rank stops at its own next step boundary)."""
        if strategy.sigterm_sync_every is not None:
            self.sigterm = SigtermAgreement(trainer, strategy, strategy.sigterm_sync_every)

    def on_train_start(self, strategy: Any, trainer: pl.Trainer) -> None:
        """Before the first step: every rank's epoch must have as many batches (uneven shards otherwise hang)."""
        counts = strategy.batches_per_epoch_of_every_rank()
        if counts is not None and len(set(counts)) > 1:
            described = ", ".join(f"rank {r}: {'unknown (iterable)' if c < 0 else c}" for r, c in enumerate(counts))
            raise GossipScheduleError(
                f"Ranks would take different numbers of training batches per epoch ({described}). Gossip pairs ranks "
                "by step number, so every rank must take the same number of steps: give every rank a shard of the "
                "same length (Lightning's DistributedSampler pads them; keep `use_distributed_sampler=True` or shard "
                "evenly yourself), or cap the epoch with `limit_train_batches`."
            )

    def on_train_batch_start(self, strategy: Any, trainer: pl.Trainer) -> None:
        """Before each training batch: the SIGTERM agreement, where Lightning has no per-step broadcast to replace."""
        if self.sigterm is not None and not self.sigterm.replaced_broadcast:
            self.sigterm.at_step()

    def refuse_collective(self, what: str) -> None:
        """Called before every collective through the strategy (lock-step: every rank is at the same step)."""

    def teardown(self) -> None:
        """At the strategy's teardown: undo what the mode changed on the user's objects (lock-step: nothing)."""


class TrainerAsynchronous(TrainerLockStep, Asynchronous):
    """Asynchronous gossip under the Trainer (see the module docstring)."""

    def __init__(self, options: Any) -> None:
        Asynchronous.__init__(self, options)
        self.flag: Optional[StopFlag] = None
        #: True from an epoch's start until every rank has met at its end: no collective may run then.
        self.inside_epoch = False
        self.agreed_step = 0  # rank 0's global step at the last epoch boundary (checkpoint file names)

    def check_before_launch(self, trainer: pl.Trainer) -> None:
        """Refuse the settings that need a collective (or equal step counts) within an epoch."""
        problems = []
        fast_dev_run = bool(trainer.fast_dev_run)  # it sets max_steps itself; every rank runs the same batches
        if trainer.fit_loop.max_steps not in (-1, None) and not fast_dev_run:
            problems.append(
                f"Trainer(max_steps={trainer.fit_loop.max_steps}): ranks count their own steps, so they would stop "
                "at different points of an epoch with data left unused; use max_epochs or max_time"
            )
        if trainer.fit_loop.min_steps:
            problems.append(f"Trainer(min_steps={trainer.fit_loop.min_steps}): use min_epochs")
        limit = trainer.limit_train_batches
        if isinstance(limit, float) and limit != 1.0 and not fast_dev_run:
            problems.append(
                f"Trainer(limit_train_batches={limit!r}): a fraction of an epoch whose share per rank follows the "
                "ranks' speeds has no length to take it of; give an int (that many batches on every rank) or 1.0"
            )
        interval = trainer.val_check_interval
        if isinstance(interval, int) or (isinstance(interval, float) and interval != 1.0):
            problems.append(
                f"Trainer(val_check_interval={interval!r}): validation inside an epoch needs every rank at the same "
                "step; validate at the end of epochs (val_check_interval=1.0, check_val_every_n_epoch=N)"
            )
        if trainer.check_val_every_n_epoch is None:
            problems.append(
                "Trainer(check_val_every_n_epoch=None) validates every N training batches; use check_val_every_n_epoch"
            )
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint) and checkpoint_saves_within_epoch(callback):
                problems.append(
                    "ModelCheckpoint(every_n_train_steps/train_time_interval) saves inside an epoch, which needs every "
                    "rank at the same step; use every_n_epochs (the default)"
                )
        if problems:
            raise AsynchronousModeError(
                f"GossipStrategy(asynchronous=True) cannot run with: {'; '.join(problems)}. "
                f"Why: {WHY_NO_STEP_COLLECTIVES}."
            )
        if not uses_distributed_sampler(trainer):
            rank_zero_warn(
                "GossipStrategy(asynchronous=True) with Trainer(use_distributed_sampler=False): the training data is "
                "not shared out dynamically, so fast ranks cannot take more batches than slow ones (the epoch ends at "
                "the slowest rank's pace). Keep use_distributed_sampler=True to let gossip share the data out."
            )

    def setup_fit(self, strategy: Any, trainer: pl.Trainer) -> None:
        """At the setup of a fit: a fresh stop flag (scoped by the run, so a later fit in this process never sees
        this one's), the SIGTERM handler and per-step broadcasts replaced by it, the epoch boundary, and the
        expected number of batches per epoch for Lightning."""
        self.check_before_launch(trainer)  # again: a Trainer built in a worker (torchrun) was never checked
        averager = strategy.averager
        self.flag = StopFlag(f"{averager.scope}/stop")
        self.inside_epoch = False
        install_stop_flag(trainer, strategy, self.flag)
        trainer.callbacks.insert(0, EpochBoundary(self, strategy, self.flag))
        expect_batches_per_epoch(trainer, self.expected_batches_per_epoch)
        for callback in trainer.callbacks:
            if isinstance(callback, ModelCheckpoint):
                agree_on_checkpoint_step(callback, lambda: self.agreed_step)

    def expected_batches_per_epoch(self) -> Optional[int]:
        """The epoch's batches over all ranks divided by the number of ranks (what an equally fast rank takes)."""
        sampler = self.sampler
        if sampler is None:
            return None
        return max(1, math.ceil(sampler.batches_per_pass() / sampler.world_size))

    def training_dataloader(
        self, dataloader: Any, seed: int, world_size: int, stop: Optional[Callable[[], bool]] = None,
        survivors: Optional[Callable[[], Any]] = None,
    ) -> Any:
        flag = self.flag
        return super().training_dataloader(
            dataloader, seed, world_size, stop=(lambda: flag.raised("stop")) if flag is not None else stop,
            survivors=survivors,
        )

    def on_train_start(self, strategy: Any, trainer: pl.Trainer) -> None:
        """LR schedulers stepped per batch follow the epoch's global progress (see the module docstring)."""
        self._restore_module = follow_global_progress(trainer, self)

    def teardown(self) -> None:
        restore, self._restore_module = getattr(self, "_restore_module", None), None
        if restore is not None:
            restore()

    def on_train_batch_start(self, strategy: Any, trainer: pl.Trainer) -> None:
        """Before each batch: the stop flag, in place of Lightning's per-step broadcast (which older Lightning
        versions do not have: this hook runs on every version)."""
        assert self.flag is not None
        self.inside_epoch = True
        check_stop_flag(trainer, strategy, self.flag)

    def refuse_collective(self, what: str) -> None:
        if self.inside_epoch:
            raise AsynchronousModeError(
                f"{what} was called inside a training epoch with GossipStrategy(asynchronous=True): "
                f"{WHY_NO_STEP_COLLECTIVES}, and this is a collective over all ranks. Log with sync_dist=False inside "
                "the epoch (each rank's own value), or on_epoch=True / in on_train_epoch_end (reduced once at the "
                "epoch's end, where every rank meets)."
            )


def trainer_mode_for(options: Any) -> TrainerLockStep:
    return TrainerAsynchronous(options) if options.mode == "asynchronous" else TrainerLockStep(options)


# -- lock-step: SIGTERM agreed on by every rank ---------------------------------------------------------------------
class SigtermAgreement:
    """Any rank's SIGTERM stops every lock-step rank at the same step.

    The signal handler only records the signal (and forwards it to the processes this one launched, as Lightning's
    does): no collective in a handler, which runs between any two bytecodes, inside a save's collectives too. Every
    ``every`` gossip steps (equal on every rank before each training step) and at each epoch's last batch, the ranks
    all-reduce their records (a matched collective); if any rank was signalled, every rank raises
    ``SIGTERMException`` there, as Lightning does after its own broadcast. ``syncs`` counts the agreements run.
    """

    def __init__(self, trainer: pl.Trainer, strategy: Any, every: int) -> None:
        self.trainer = trainer
        self.strategy = strategy
        self.every = every
        self.received: list = []
        self.syncs = 0
        replace_sigterm_notifier(trainer, self._notified)
        #: Whether Lightning's per-step broadcast was there to replace (else the strategy's batch hook runs it).
        self.replaced_broadcast = replace_sigterm_broadcast(trainer, self.at_step)
        trainer.callbacks.insert(0, _AgreeAtEpochEnd(self))

    def _notified(self, signum: Any, frame: Any) -> None:
        if not self.received:
            launcher = self.trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        self.received.append(signum)

    def at_step(self) -> None:
        if self.strategy.gossip_step % self.every == 0:
            self.agree()

    def agree(self) -> None:
        signalled = torch.tensor([1 if self.received else 0], device=self.strategy.root_device)
        with self.strategy.core.collective("the agreement on SIGTERM (every sigterm_sync_every steps)"):
            dist.all_reduce(signalled, op=dist.ReduceOp.MAX)
        self.syncs += 1
        if signalled.item():
            signal_connector(self.trainer).received_sigterm = True
            raise SIGTERMException()


class _AgreeAtEpochEnd(Callback):
    def __init__(self, agreement: SigtermAgreement) -> None:
        self.agreement = agreement

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if last_batch_of_epoch(trainer):
            self.agreement.agree()


# -- asynchronous: the stop flag ------------------------------------------------------------------------------------
class StopFlag:
    """Flags in the process group's store that any rank can raise and every rank sees within a fraction of a second.

    Two reasons, two keys: ``"sigterm"`` (stop now, as Lightning does on SIGTERM) and ``"stop"`` (end training at the
    end of the current epoch, e.g. ``max_time`` ran out). ``scope`` must be the same on every rank and new for every
    fit (the store outlives a fit): the averager's run scope is.
    """

    REASONS = ("sigterm", "stop")

    def __init__(self, scope: str, poll_seconds: float = STOP_POLL_SECONDS) -> None:
        self.prefix = scope
        self.poll_seconds = poll_seconds
        self._last_poll = 0.0
        self._seen: set[str] = set()

    @staticmethod
    def _store() -> dist.Store:
        return gossip_store()  # calls bounded: a hung or lost store host raises a GossipPeerError naming it

    def raise_flag(self, reason: str) -> None:
        if reason not in self._seen:
            self._seen.add(reason)
            self._store().set(f"{self.prefix}/{reason}", "1")

    def raised(self, reason: str, force: bool = False) -> bool:
        """Whether any rank raised ``reason`` (asks the store at most every ``poll_seconds`` unless ``force``)."""
        if reason in self._seen:
            return True
        now = time.monotonic()
        if force or now - self._last_poll >= self.poll_seconds:
            self._last_poll = now
            store = self._store()
            self._seen.update(r for r in self.REASONS if store.check([f"{self.prefix}/{r}"]))
        return reason in self._seen

    def rendezvous(
        self, name: str, rank: int, world_size: int, timeout: float, watch_sigterm: bool = True, vote: str = ""
    ) -> Optional[list[str]]:
        """Wait until every rank has arrived here, watching for SIGTERM while waiting (unlike a collective).

        Returns every rank's ``vote`` (the same list on every rank: each vote is written before its rank arrives),
        or None if not every rank arrived. With ``watch_sigterm``, stops for SIGTERM (see :meth:`stop_for_sigterm`)
        if any rank raised it, and raises a :class:`GossipPeerError` naming the ranks that did not arrive within
        ``timeout`` seconds; without, gives up after ``timeout`` and returns None.
        """
        store = self._store()
        key = f"{self.prefix}/rendezvous/{name}"
        store.set(f"{key}/{rank}", vote)
        arrived = store.add(f"{key}/count", 1)
        deadline = time.monotonic() + timeout
        while arrived < world_size:
            if watch_sigterm and self.raised("sigterm", force=True):
                self.stop_for_sigterm(rank, world_size, timeout)
            if time.monotonic() > deadline:
                if not watch_sigterm:
                    return None
                missing = [r for r in range(world_size) if not store.check([f"{key}/{r}"])]
                raise peer_lost_error(  # names the rank the heartbeats show hung or gone, if they do
                    rank, missing, f"the end of the training epoch ({name})",
                    TimeoutError(f"rank(s) {missing} did not arrive within {timeout:.0f} s"),
                )
            time.sleep(0.01)
            arrived = store.add(f"{key}/count", 0)
        return [store.get(f"{key}/{r}").decode() for r in range(world_size)]

    def stop_for_sigterm(self, rank: int, world_size: int, timeout: float) -> None:
        """Every rank stops sending and meets here before any exits, so no gossip send goes to a rank that is gone
        (a rank that does not come within ``timeout`` is not waited for), then ``SIGTERMException``, as Lightning."""
        self.raise_flag("sigterm")
        self.rendezvous("sigterm", rank, world_size, min(timeout, 60.0), watch_sigterm=False)
        raise SIGTERMException()


def _timeout_seconds(strategy: Any) -> float:
    timeout = getattr(strategy, "_timeout", None)
    return timeout.total_seconds() if timeout is not None else 1800.0


def _out_of_time(trainer: pl.Trainer) -> bool:
    for callback in trainer.callbacks:
        if isinstance(callback, Timer):
            duration = timer_duration(callback)
            if duration is not None and callback.time_elapsed() >= duration:
                return True
    return False


class EpochBoundary(Callback):
    """The one point of an epoch every rank reaches: its last training batch (the shared data is used up).

    Placed first among the callbacks, it marks the start of every epoch (no collective from then on) and, at the
    epoch's last batch, waits for every rank (watching for SIGTERM) before anything global runs at the epoch's end
    (the monitor's consensus distance, validation, checkpoints). There every rank decides identically whether training
    stops (each votes, as it arrives, whether it has seen ``"stop"``), and all take rank 0's global step for the
    checkpoint file names (each rank counts its own steps).
    """

    def __init__(self, mode: TrainerAsynchronous, strategy: Any, flag: StopFlag) -> None:
        self.mode = mode
        self.strategy = strategy
        self.flag = flag

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mode.inside_epoch = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not last_batch_of_epoch(trainer):
            return
        if _out_of_time(trainer):
            self.flag.raise_flag("stop")
        # Decided from the votes cast on arrival, not from the flag read afterwards: a fast rank may raise the flag
        # after this rendezvous (in the next epoch), which must not make only some ranks stop here.
        stop = self.flag.raised("stop", force=True)
        votes = self.flag.rendezvous(
            f"epoch{trainer.current_epoch}", trainer.global_rank, trainer.world_size, _timeout_seconds(self.strategy),
            vote=f"{int(stop)}\t{trainer.global_step}",
        )
        if votes is None:
            return
        self.mode.inside_epoch = False
        self.mode.agreed_step = int(votes[0].split("\t")[1])
        if any(vote.split("\t")[0] == "1" for vote in votes):
            trainer.should_stop = True


def install_stop_flag(trainer: pl.Trainer, strategy: Any, flag: StopFlag) -> None:
    """Replace Lightning's SIGTERM handler, its per-step SIGTERM broadcast and the Timer's per-batch broadcast by
    ``flag`` (checked before every batch by :func:`check_stop_flag`).

    SIGTERM on any rank stops every rank within about ``STOP_POLL_SECONDS`` plus one training step, as Lightning
    does (``SIGTERMException``). ``max_time`` running out on any rank ends the epoch for every rank at its next
    chunk of data (the work-sharing sampler stops handing out data), and training stops at that epoch's end, so
    validation and checkpoints still run once, at the same point, on every rank.
    """
    received: list = []

    def sigterm_notifier(signum: Any, frame: Any) -> None:
        # Lightning's notifier, without its broadcast (a collective from a signal handler that other ranks, being
        # at other steps, would not match). The store is asked from the training loop, not from the handler.
        # Not connector.received_sigterm yet: Lightning would raise SIGTERMException after this very batch, before
        # the other ranks know, and they would then send to a rank that is gone. check_stop_flag sets it once every
        # rank has stopped.
        if not received:
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        received.append(signum)

    flag.sigterm_received = received  # type: ignore[attr-defined]
    replace_sigterm_notifier(trainer, sigterm_notifier)
    replace_sigterm_broadcast(trainer, lambda: None)  # checked in on_train_batch_start instead, on every version
    for callback in trainer.callbacks:
        if isinstance(callback, Timer):
            silence_timer_broadcast(callback)  # its decision comes through the flag (checked at the boundary too)


def check_stop_flag(trainer: pl.Trainer, strategy: Any, flag: StopFlag) -> None:
    if getattr(flag, "sigterm_received", None):
        flag.raise_flag("sigterm")
    if _out_of_time(trainer):
        flag.raise_flag("stop")
    if flag.raised("sigterm"):
        signal_connector(trainer).received_sigterm = True
        flag.stop_for_sigterm(trainer.global_rank, trainer.world_size, _timeout_seconds(strategy))


# -- LR schedules that follow the epoch's global progress -----------------------------------------------------------
def follow_global_progress(trainer: pl.Trainer, mode: TrainerAsynchronous) -> Optional[Callable[[], None]]:
    """Make the LR schedulers Lightning steps per optimizer step follow the run's global progress instead of this
    rank's own step count; returns what undoes it (or None if there is nothing to follow).

    The LightningModule's ``lr_scheduler_step`` hook (Lightning's own seam for stepping a scheduler) is called as often
    as it takes to bring the scheduler to: the batches all ranks have finished this epoch divided by the number of
    ranks, plus the expected batches of the epochs before, in optimizer steps and scheduler ``frequency``. A fast rank
    then steps its schedule less than once per batch, a slow one more, every rank's learning rate is where the run
    is, and no rank steps past ``trainer.estimated_stepping_batches`` (``OneCycleLR`` raises if stepped past its
    ``total_steps``). Schedulers without a step count (``last_epoch``) are stepped as Lightning asks.
    """
    module = trainer.lightning_module
    followed = {id(config.scheduler): config for config in trainer.lr_scheduler_configs
                if config.interval == "step" and not config.reduce_on_plateau
                and hasattr(config.scheduler, "last_epoch")}
    if module is None or not followed:
        return None
    hook = module.lr_scheduler_step  # bound: the user's override or Lightning's default

    def lr_scheduler_step(scheduler: Any, metric: Any) -> None:
        config = followed.get(id(scheduler))
        sampler, expected = mode.sampler, mode.expected_batches_per_epoch()
        if config is None or sampler is None or expected is None:
            hook(scheduler, metric)
            return
        finished = min(expected, sampler.batches_finished_by_all() // sampler.world_size)
        batches = trainer.current_epoch * expected + finished
        target = batches // max(1, trainer.accumulate_grad_batches) // max(1, int(config.frequency))
        while scheduler.last_epoch < target:
            hook(scheduler, metric)

    module.lr_scheduler_step = lr_scheduler_step  # type: ignore[method-assign]

    def restore() -> None:
        if vars(module).get("lr_scheduler_step") is lr_scheduler_step:
            del module.lr_scheduler_step

    return restore
