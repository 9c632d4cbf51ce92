"""What asynchronous gossip needs from Lightning, kept out of the strategy: work-sharing data, a stop flag in the
store instead of per-step broadcasts, and a clear refusal of what needs every rank at the same step.

In asynchronous mode ranks take different numbers of optimizer steps in an epoch. A collective issued per training
step would then pair step 37 of one rank with step 52 of another, or wait for a rank that has finished its epoch:
a hang or silently wrong results. So, inside an epoch:

* Lightning's per-step SIGTERM broadcast is replaced by a flag in the process group's store: a rank that receives
  SIGTERM sets it, every rank checks it (at most every ``STOP_POLL_SECONDS``) and stops. ``max_time`` (Lightning's
  Timer broadcasts its decision after every batch) uses the same flag: the first rank out of time stops them all.
* Settings that need a collective per step are refused before training (see :func:`check_trainer`), and
  ``self.log(..., sync_dist=True)`` inside ``training_step`` raises at once (see :func:`refuse_step_collective`).

At an epoch's end every rank comes to the same point (the data is used up for everyone), so validation on the
consensus, epoch-level logging, EarlyStopping and ModelCheckpoint work as usual after the quiescence there.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch.distributed as dist
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, Timer
from lightning.pytorch.trainer.states import RunningStage
from lightning.pytorch.utilities.data import _update_dataloader
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

from lightning_gossip._lightning_compat import SIGTERM_BROADCAST_METHOD
from lightning_gossip.gossip.errors import store as gossip_store
from lightning_gossip.gossip.work_sharing import WorkSharingSampler

if TYPE_CHECKING:
    import lightning.pytorch as pl

# Batches claimed at a time: one store call per this many steps, and at an epoch's end a slow rank holds at most
# this many batches that a fast rank could otherwise have taken.
CHUNK_BATCHES = 4
STOP_POLL_SECONDS = 0.2

_WHY = (
    "asynchronous gossip lets ranks take different numbers of optimizer steps within an epoch, so nothing may need "
    "every rank at the same training step"
)


class AsynchronousModeError(ValueError):
    """A Trainer setting that needs every rank at the same training step, refused in asynchronous mode."""


def check_trainer(trainer: "pl.Trainer") -> None:
    """Refuse, before training starts, the settings that need a collective (or equal step counts) within an epoch."""
    problems = []
    if trainer.fit_loop.max_steps not in (-1, None):
        problems.append(
            f"Trainer(max_steps={trainer.fit_loop.max_steps}): ranks count their own steps, so they would stop at "
            "different points of an epoch with data left unused; use max_epochs or max_time"
        )
    if trainer.fit_loop.min_steps:
        problems.append(f"Trainer(min_steps={trainer.fit_loop.min_steps}): use min_epochs")
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
        if isinstance(callback, ModelCheckpoint) and (
            callback._every_n_train_steps or callback._train_time_interval is not None
        ):
            problems.append(
                "ModelCheckpoint(every_n_train_steps/train_time_interval) saves inside an epoch, which needs every "
                "rank at the same step; use every_n_epochs (the default)"
            )
    if problems:
        raise AsynchronousModeError(
            f"GossipStrategy(asynchronous=True) cannot run with: {'; '.join(problems)}. Why: {_WHY}."
        )
    if not trainer._accelerator_connector.use_distributed_sampler:
        rank_zero_warn(
            "GossipStrategy(asynchronous=True) with Trainer(use_distributed_sampler=False): the training data is not "
            "shared out dynamically, so fast ranks cannot take more batches than slow ones (the epoch ends at the "
            "slowest rank's pace). Keep use_distributed_sampler=True to let gossip share the data out."
        )


def work_sharing_dataloader(
    dataloader: Any, seed: int, world_size: int, stop: Optional[Callable[[], bool]] = None
) -> Any:
    """The training dataloader with Lightning's DistributedSampler replaced by a :class:`WorkSharingSampler`.

    Every sample is used once per epoch over all ranks; shuffling follows the user's dataloader, seeded by
    ``seed`` and the epoch (Lightning calls ``set_epoch``). Anything that is not a plain map-style dataloader with a
    random or sequential order (an IterableDataset, a custom sampler or batch sampler) is refused with a clear error.
    """
    if not isinstance(dataloader, DataLoader):
        return dataloader
    sampler = dataloader.sampler
    if isinstance(sampler, WorkSharingSampler):
        return dataloader
    if isinstance(dataloader.dataset, IterableDataset):
        raise AsynchronousModeError(
            "GossipStrategy(asynchronous=True) shares a map-style dataset out between ranks, but the training "
            f"dataloader holds an IterableDataset ({type(dataloader.dataset).__name__}), which it cannot index. "
            "Use a map-style Dataset (with __getitem__ and __len__), or the lock-step mode."
        )
    if type(sampler) is DistributedSampler:
        shuffle = sampler.shuffle
    elif type(sampler) in (RandomSampler, SequentialSampler):  # Lightning did not add a DistributedSampler
        shuffle = isinstance(sampler, RandomSampler)
    else:
        raise AsynchronousModeError(
            "GossipStrategy(asynchronous=True) shares the training data out between ranks itself (every sample once "
            f"per epoch, in seeded shuffled or natural order), so it cannot use the sampler {type(sampler).__name__} "
            "(a DistributedSamplerWrapper means a custom sampler was given). Use shuffle=True/False in the DataLoader."
        )
    if dataloader.batch_size is None:
        raise AsynchronousModeError(
            "GossipStrategy(asynchronous=True) needs the training DataLoader's batch_size (a custom batch_sampler "
            "cannot be shared out between ranks)."
        )
    shared = WorkSharingSampler(
        dataloader.dataset,
        batch_size=dataloader.batch_size,
        chunk_batches=CHUNK_BATCHES,
        shuffle=shuffle,
        seed=seed,
        world_size=world_size,
        stop=stop,
    )
    return _update_dataloader(dataloader, shared, mode=RunningStage.TRAINING)


class StopFlag:
    """Flags in the process group's store that any rank can raise and every rank sees within a fraction of a second.

    Two reasons, two keys: ``"sigterm"`` (stop now, as Lightning does on SIGTERM) and ``"stop"`` (end training at the
    end of the current epoch, e.g. ``max_time`` ran out). ``scope`` must be the same on every rank and new for every
    fit (the store outlives a fit).
    """

    REASONS = ("sigterm", "stop")

    def __init__(self, scope: str, poll_seconds: float = STOP_POLL_SECONDS) -> None:
        self.prefix = f"lightning_gossip/async/{scope}"
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
        self, name: str, rank: int, world_size: int, timeout: float, watch_sigterm: bool = True, vote: bool = False
    ) -> Optional[list[bool]]:
        """Wait until every rank has arrived here, watching for SIGTERM while waiting (unlike a collective).

        Returns every rank's ``vote`` (the same list on every rank: each vote is written before its rank arrives),
        or None if not every rank arrived. With ``watch_sigterm``, stops for SIGTERM (see :meth:`stop_for_sigterm`)
        if any rank raised it, and raises a :class:`GossipPeerError` naming the ranks that did not arrive within
        ``timeout`` seconds; without, gives up after ``timeout`` and returns None.
        """
        from lightning_gossip.gossip.errors import peer_lost_error

        store = self._store()
        key = f"{self.prefix}/rendezvous/{name}"
        store.set(f"{key}/{rank}", "1" if vote else "0")
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
        return [store.get(f"{key}/{r}") == b"1" for r in range(world_size)]

    def stop_for_sigterm(self, rank: int, world_size: int, timeout: float) -> None:
        """Every rank stops sending and meets here before any exits, so no gossip send goes to a rank that is gone
        (a rank that does not come within ``timeout`` is not waited for), then ``SIGTERMException``, as Lightning."""
        self.raise_flag("sigterm")
        self.rendezvous("sigterm", rank, world_size, min(timeout, 60.0), watch_sigterm=False)
        raise SIGTERMException()


def _timeout_seconds(strategy: Any) -> float:
    timeout = getattr(strategy, "_timeout", None)
    return timeout.total_seconds() if timeout is not None else 1800.0


def _timers(trainer: "pl.Trainer") -> list[Timer]:
    return [callback for callback in trainer.callbacks if isinstance(callback, Timer)]


def _out_of_time(trainer: "pl.Trainer") -> bool:
    return any(
        timer._duration is not None and timer.time_elapsed() >= timer._duration for timer in _timers(trainer)
    )


class EpochBoundary(Callback):
    """The one point of an epoch every rank reaches: its last training batch (the shared data is used up).

    Placed first among the callbacks, it waits for every rank there (watching for SIGTERM) before anything global
    runs at the epoch's end (the monitor's consensus distance, validation, checkpoints), and decides identically on
    every rank whether training stops here: every rank votes (has it seen ``"stop"``?) as it arrives, and all decide
    from the same votes.
    """

    def __init__(self, strategy: Any, flag: StopFlag) -> None:
        self.strategy = strategy
        self.flag = flag

    def on_train_batch_end(self, trainer: "pl.Trainer", *args: Any, **kwargs: Any) -> None:
        if not trainer.is_last_batch:
            return
        if _out_of_time(trainer):
            self.flag.raise_flag("stop")
        # Decided from the votes cast on arrival, not from the flag read afterwards: a fast rank may raise the flag
        # after this rendezvous (in the next epoch), which must not make only some ranks stop here.
        votes = self.flag.rendezvous(
            f"epoch{trainer.current_epoch}", trainer.global_rank, trainer.world_size, _timeout_seconds(self.strategy),
            vote=self.flag.raised("stop", force=True),
        )
        if votes is not None and any(votes):
            trainer.should_stop = True


def install_stop_flag(trainer: "pl.Trainer", strategy: Any, flag: StopFlag) -> None:
    """Replace Lightning's per-step SIGTERM broadcast (and the Timer's per-batch broadcast) by ``flag``.

    SIGTERM on any rank stops every rank within about ``STOP_POLL_SECONDS`` plus one training step, as Lightning
    does (``SIGTERMException``). ``max_time`` running out on any rank ends the epoch for every rank at its next
    chunk of data (the work-sharing sampler stops handing out data), and training stops at that epoch's end, so
    validation and checkpoints still run once, at the same point, on every rank.
    """
    connector = trainer._signal_connector
    sigterm_received: list = []

    def sigterm_notifier(signum: Any, frame: Any) -> None:
        # Lightning's notifier, without its broadcast (a collective from a signal handler that other ranks, being
        # at other steps, would not match). The store is asked from the training loop, not from the handler.
        # Not connector.received_sigterm yet: Lightning would raise SIGTERMException after this very batch, before
        # the other ranks know, and they would then send to a rank that is gone. check_stop_flag sets it once every
        # rank has stopped.
        if not sigterm_received:
            launcher = trainer.strategy.launcher
            if launcher is not None:
                launcher.kill(signum)
        sigterm_received.append(signum)

    # register_signal_handlers() runs after the strategy's setup and reads this attribute then.
    connector._sigterm_notifier_fn = sigterm_notifier

    def check_stop_flag() -> None:
        if sigterm_received:
            flag.raise_flag("sigterm")
        if _out_of_time(trainer):
            flag.raise_flag("stop")
        if flag.raised("sigterm"):
            connector.received_sigterm = True
            flag.stop_for_sigterm(trainer.global_rank, trainer.world_size, _timeout_seconds(strategy))

    # Called by the training epoch loop before every batch in place of the broadcast.
    setattr(trainer.fit_loop.epoch_loop, SIGTERM_BROADCAST_METHOD, check_stop_flag)
    for timer in _timers(trainer):
        # Its per-batch broadcast of rank 0's decision is replaced by the flag (checked above and at the boundary).
        timer.on_train_batch_end = lambda *args, **kwargs: None  # type: ignore[method-assign]
    trainer.callbacks.insert(0, EpochBoundary(strategy, flag))


def refuse_step_collective(what: str) -> None:
    raise AsynchronousModeError(
        f"{what} was called inside training_step with GossipStrategy(asynchronous=True): {_WHY}, and this is a "
        "collective over all ranks. Log with sync_dist=False on step (each rank's own value), or log on_epoch=True "
        "(reduced once at the epoch's end, where every rank meets)."
    )


# -- the strategy's asynchronous-mode hooks (GossipStrategy calls these when asynchronous=True) ---------------------
def seed_of(strategy: Any) -> int:
    """The gossip seed, else Lightning's global seed (``seed_everything``), else 0: it also seeds the shuffling."""
    import os

    return strategy.options.schedule_seed(fallback=int(os.environ.get("PL_GLOBAL_SEED", 0)))


def setup_fit(strategy: Any, trainer: "pl.Trainer") -> None:
    """At setup of a fit: refuse what cannot work, then put the stop flag in place of per-step broadcasts."""
    check_trainer(trainer)
    strategy._async_fits = getattr(strategy, "_async_fits", 0) + 1  # the same on every rank: a fresh flag per fit
    flag = StopFlag(f"fit{strategy._async_fits}")
    strategy._async_stop_flag = flag
    install_stop_flag(trainer, strategy, flag)


def process_dataloader(strategy: Any, dataloader: Any) -> Any:
    """The training dataloader gets the work-sharing sampler; evaluation dataloaders keep equal shards."""
    trainer = strategy.lightning_module.trainer if strategy.lightning_module is not None else None
    if trainer is None or not trainer.training or not trainer._accelerator_connector.use_distributed_sampler:
        return dataloader
    flag = getattr(strategy, "_async_stop_flag", None)
    stop = (lambda: flag.raised("stop")) if flag is not None else None
    return work_sharing_dataloader(dataloader, seed_of(strategy), strategy.world_size, stop)
