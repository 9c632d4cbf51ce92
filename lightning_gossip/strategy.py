"""GossipStrategy: Lightning's multi-process training with GoSGD gossip instead of DDP's gradient all-reduce.

A thin adapter. It reuses everything of :class:`~lightning.pytorch.strategies.DDPStrategy` that is about processes
(launchers, cluster environments, process groups, distributed samplers, metric reduction for logging) and replaces
what is about gradients: the model is never wrapped in ``DistributedDataParallel``; after every optimizer step a
:class:`~lightning_gossip.gossip.GossipAverager` runs the GoSGD step. The algorithm lives in
:mod:`lightning_gossip.gossip` and knows nothing of Lightning.
"""

from __future__ import annotations

import logging
import os
from contextlib import AbstractContextManager, ExitStack, nullcontext
from datetime import timedelta
from typing import Any, Callable, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

import lightning.pytorch as pl
from lightning_gossip import async_support
from lightning_gossip._lightning_compat import throttle_sigterm_broadcast
from lightning_gossip.callbacks import GossipMonitor
from lightning_gossip.checkpoint_io import AtomicCheckpointIO, check_checkpoint_fits
from lightning_gossip.gossip import GossipAverager, GossipCounters, GossipOptions
from lightning_gossip.gossip.averager import ExchangeFactory
from lightning_gossip.gossip.errors import collective_guard
from lightning_gossip.gossip.options import check_bool, check_optional_int
from lightning_gossip.gossip.state import NO_FLOAT_TENSORS, gossiped_tensors
from lightning_gossip.gossip.topology import TopologyLike, validate_topology
from lightning_gossip.launchers import GossipMultiProcessingLauncher, GossipSubprocessScriptLauncher

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "gossip"


class GossipStrategy(DDPStrategy):
    """Decentralized data-parallel training with GoSGD (sum-weight gossip).

    Every rank trains its own copy of the model on its own shard of the data. There is no gradient all-reduce:
    with probability ``p`` after each optimizer step a rank halves its gossip weight and pushes (weights, weight) to
    a peer chosen by ``topology``, which mixes them in by the sum-weight rule.

    Args:
        p: gossip probability per rank and step, in [0, 1]. ``p=0`` with ``average_every=H`` is Local SGD.
        topology: ``"random"`` (GoSGD), ``"ring"``, ``"exponential"`` (SGP's time-varying graph), or an object
            with a ``peer(rank, world_size, step, u) -> int`` method.
        seed: seeds the gossip schedule; ``None`` takes Lightning's global seed (``seed_everything``) or 0.
        mix_buffers: gossip floating-point buffers (BatchNorm running statistics) too.
        overlap: mix step t's messages in after step t+1's optimizer step, so transfers hide behind compute
            (the same as ``staleness=1``).
        staleness: bounded staleness K: mix step t's messages in after step t+K's optimizer step, so a transfer
            slower than one step (a large model on a slow link) hides behind K steps of compute. ``None`` follows
            ``overlap`` (0 or 1). Deterministic and resumable like the other modes; the mixed-in models are K steps
            old, which costs some accuracy as K grows.
        average_every: an exact global average every this many steps (Gossip-PGA); ``None`` for never.
        transfer_dtype: ``None`` (the model's dtype), ``"bfloat16"`` or ``"float16"`` on the wire.
        eval_mode: ``"consensus"`` evaluates (validate/test/predict) the exact average of all ranks, put in place
            temporarily; ``"local"`` evaluates each rank's own model.
        final_consensus: at the end of ``fit``, put the exact average on every rank.
        on_nonfinite: a received message with NaN/Inf is dropped with a warning (``"warn"``) or raises
            (``"error"``).
        asynchronous: GoSGD as published: no rank waits for another during an epoch (see the README).
        monitor: add a :class:`~lightning_gossip.callbacks.GossipMonitor` (logs ``gossip/...``) if none is present.
        sigterm_sync_every: Lightning (>= 2.5) broadcasts rank 0's SIGTERM flag before every training step, a
            global synchronisation that ties every rank to every other each step and, on slow links, queues behind
            gossip messages. Gossip does it only every this many steps (so a SIGTERM still stops all ranks within
            that many steps); ``None`` never does.
        timeout: process-group timeout; a peer that stops answering turns into a :class:`GossipPeerError` naming
            it after this long instead of a hang (a peer that dies is usually reported at once).

    Reliability: checkpoints hold every rank's own weights, gossip weight, in-flight messages and optimizer state, and
    are written atomically (temporary file in the same directory, fsync, rename), so resuming with the same number of
    workers is exact and a crash while saving leaves the previous checkpoint intact. Resuming with a different number
    of workers starts every rank from the checkpoint's consensus model (see :meth:`load_model_state_dict`). A lost
    peer raises :class:`GossipPeerError` naming it; the launching process then stops its local worker processes.

    Optimizer state (momentum, Adam moments) stays local to each rank; only the model is gossiped.
    """

    strategy_name = "gossip"
    #: A subclass may set this to move messages its own way: a factory ``(state, options, group, schedule) ->
    #: exchange`` (see :class:`~lightning_gossip.gossip.exchange.Exchange`); ``None`` picks the library's exchange.
    exchange_factory: Optional[ExchangeFactory] = None

    def __init__(
        self,
        p: float = 0.1,
        topology: TopologyLike = "random",
        seed: Optional[int] = None,
        mix_buffers: bool = True,
        overlap: bool = False,
        staleness: Optional[int] = None,
        average_every: Optional[int] = None,
        transfer_dtype: Optional[str] = None,
        eval_mode: Literal["consensus", "local"] = "consensus",
        final_consensus: bool = True,
        on_nonfinite: Literal["warn", "error"] = "warn",
        asynchronous: bool = False,
        monitor: bool = True,
        sigterm_sync_every: Optional[int] = 50,
        accelerator: Optional["pl.accelerators.Accelerator"] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision_plugin: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        # Every option is checked here, once, before any worker process is started.
        self.options = GossipOptions(
            p=p,
            topology=topology,
            seed=seed,
            mix_buffers=mix_buffers,
            overlap=overlap,
            staleness=staleness,
            average_every=average_every,
            transfer_dtype=transfer_dtype,
            on_nonfinite=on_nonfinite,
            eval_mode=eval_mode,
            final_consensus=final_consensus,
            asynchronous=asynchronous,
        )
        self.monitor = check_bool("monitor", monitor)
        self.sigterm_sync_every = check_optional_int("sigterm_sync_every", sigterm_sync_every, minimum=1, unit="steps")
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
            raise TypeError(
                f"timeout must be None or a positive datetime.timedelta (e.g. timedelta(seconds=60)), got {timeout!r}."
            )
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self.averager: Optional[GossipAverager] = None
        self._resume_state: Optional[dict[str, Any]] = None
        self._resume_step: Optional[int] = None  # resuming onto a different number of workers: the schedule position
        self._eval_stack: Optional[ExitStack] = None

    # -- read-outs ------------------------------------------------------------------------------------------------
    @property
    def p(self) -> float:
        return self.options.p

    @property
    def staleness(self) -> int:
        return self.options.staleness

    @property
    def overlap(self) -> bool:
        """Whether exchanges are mixed in later than they are posted (``staleness >= 1``)."""
        return self.options.overlap

    @property
    def gossip_weight(self) -> float:
        """This rank's gossip weight a_i (float64). Over all ranks (and messages in flight) they sum to 1."""
        return self.averager.weight if self.averager is not None else 1.0 / max(1, self.world_size)

    @property
    def counters(self) -> GossipCounters:
        """Messages and bytes this rank sent and received, rejected messages, gossip steps taken."""
        return self.averager.counters if self.averager is not None else GossipCounters()

    @property
    def gossip_step(self) -> int:
        """The schedule position: how many gossip steps this rank has taken."""
        return self.averager.step_count if self.averager is not None else 0

    # -- launching ------------------------------------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        # The world size is known here, before any process is started: reject a topology that cannot work now.
        validate_topology(self.options.topology, self.num_nodes * self.num_processes)
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = GossipSubprocessScriptLauncher(
                self.cluster_environment, self.num_processes, self.num_nodes, before_launch=self._check_before_launch
            )
        else:
            self._launcher = GossipMultiProcessingLauncher(
                self,
                start_method=self._start_method,
                before_launch=self._check_before_launch,
                results_context=self._consensus_for_results,
            )

    def _check_before_launch(self, trainer: Optional["pl.Trainer"]) -> None:
        """Checks that need the model but no process group, run before any worker process is started."""
        if self.options.asynchronous and trainer is not None and self._fitting(trainer):
            async_support.check_trainer(trainer)
        module = trainer.lightning_module if trainer is not None else None
        if module is None or trainer.state.fn != TrainerFn.FITTING or is_overridden("configure_model", module):
            return  # a model built in `configure_model` only gets its tensors after the launch
        if not gossiped_tensors(module, self.options.mix_buffers):
            raise ValueError(f"{NO_FLOAT_TENSORS} (model: {type(module).__name__}).")

    def _consensus_for_results(self, trainer: "pl.Trainer") -> AbstractContextManager:
        """The spawn launcher hands rank 0's module back to the parent: make that the consensus model."""
        if self.averager is None or self.world_size == 1 or trainer.state.fn != TrainerFn.FITTING:
            return nullcontext()
        return self.averager.consensus_swapped_in()

    @override
    def on_exception(self, exception: BaseException) -> None:
        """A failed rank 0 stops the worker processes it launched, so none is left waiting for it.

        Lightning already does the reverse (its process observer kills everything when a worker exits with an
        error); without this, the workers of a failed launcher would wait for it until the process-group timeout.
        """
        super().on_exception(exception)
        if self.options.asynchronous and self.averager is not None:
            self.averager.exchange.close(clean=False)  # other ranks may be gone: no collective, daemon threads stay
        if isinstance(self._launcher, GossipSubprocessScriptLauncher):
            self._launcher.stop_children()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.world_size == 1:
            rank_zero_warn(
                "GossipStrategy runs with a single process (world size 1): nothing is gossiped and training is "
                "plain single-process training. Use devices>1 or num_nodes>1 to gossip."
            )

    # -- setup: Lightning's DDP setup, with the averager where DDP puts its wrapper --------------------------------
    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        # Evaluating after this process already trained: each rank keeps the model gossip left it with (eval_mode
        # decides what is evaluated), but DDPStrategy.setup broadcasts rank 0's weights when not fitting.
        kept = self.averager.state.flatten() if self.averager is not None and not self._fitting(trainer) else None
        super().setup(trainer)
        if kept is not None:
            assert self.averager is not None
            self.averager.refresh_tensors()  # model_to_device may have replaced buffer tensors
            self.averager.state.load_flat(kept)
        if self.monitor and not any(isinstance(cb, GossipMonitor) for cb in trainer.callbacks):
            trainer.callbacks.append(GossipMonitor())

    @staticmethod
    def _fitting(trainer: "pl.Trainer") -> bool:
        return trainer.state.fn == TrainerFn.FITTING

    @override
    def configure_ddp(self) -> None:
        """Where DDP wraps the model in ``DistributedDataParallel`` (its gradient all-reduce), gossip sets up the
        averager and leaves the model as it is."""
        assert self.lightning_module is not None
        resume, self._resume_state = self._resume_state, None
        seed = self.options.schedule_seed(fallback=int(os.environ.get("PL_GLOBAL_SEED", 0)))
        # Resuming: every rank loaded its own weights from the checkpoint; broadcasting would erase them.
        self.averager = GossipAverager(
            self.lightning_module,
            self.options.replace(seed=seed),
            exchange=self.exchange_factory,
            broadcast=resume is None,
        )
        if resume is not None:
            self.averager.load_state_dict(resume)
        elif self._resume_step is not None:
            self.averager.continue_schedule_at(self._resume_step)
        self._resume_step = None
        trainer = self.lightning_module.trainer
        if self.options.asynchronous:
            # Ranks take different numbers of steps: no per-step broadcast, a stop flag in the store instead.
            async_support.setup_fit(self, trainer)
            return
        # The gossip step count is the same on every rank before each training step, so the broadcast stays a
        # matched collective.
        every = self.sigterm_sync_every
        throttle_sigterm_broadcast(trainer, lambda: every is not None and self.gossip_step % every == 0)

    # -- training -------------------------------------------------------------------------------------------------
    @override
    def optimizer_step(
        self,
        optimizer: Optimizer,
        closure: Callable[[], Any],
        model: Optional[Union["pl.LightningModule", torch.nn.Module]] = None,
        **kwargs: Any,
    ) -> Any:
        output = super().optimizer_step(optimizer, closure, model, **kwargs)
        if self.averager is not None:
            self.averager.step()
        return output

    @override
    def on_train_end(self) -> None:
        if self.averager is not None:
            self.averager.end()

    # -- asynchronous mode (issue 10): the Lightning side lives in async_support ---------------------------------
    _in_training_step = False

    @override
    def process_dataloader(self, dataloader: Any) -> Any:
        dataloader = super().process_dataloader(dataloader)
        return async_support.process_dataloader(self, dataloader) if self.options.asynchronous else dataloader

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        if not self.options.asynchronous:
            return super().training_step(*args, **kwargs)
        self._in_training_step = True  # a collective in here would pair different steps of different ranks
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._in_training_step = False

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        if self._in_training_step:
            async_support.refuse_step_collective("A reduction over ranks (self.log(..., sync_dist=True) on step)")
        return super().reduce(tensor, group=group, reduce_op=reduce_op)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _enter_consensus(self) -> None:
        if self.options.eval_mode != "consensus" or self.averager is None or self.world_size == 1:
            return
        if self._eval_stack is None:
            self._eval_stack = ExitStack()
            self._eval_stack.enter_context(self.averager.consensus_swapped_in())

    def _leave_consensus(self) -> None:
        if self._eval_stack is not None:
            stack, self._eval_stack = self._eval_stack, None
            stack.close()

    @override
    def on_validation_start(self) -> None:
        self._enter_consensus()

    @override
    def on_validation_end(self) -> None:
        self._leave_consensus()

    @override
    def on_test_start(self) -> None:
        self._enter_consensus()

    @override
    def on_test_end(self) -> None:
        self._leave_consensus()

    @override
    def on_predict_start(self) -> None:
        self._enter_consensus()

    @override
    def on_predict_end(self) -> None:
        self._leave_consensus()

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @property  # type: ignore[override]
    def checkpoint_io(self) -> CheckpointIO:
        """The user's (or Lightning's default) ``CheckpointIO``, wrapped so local files are written atomically."""
        io = DDPStrategy.checkpoint_io.fget(self)  # type: ignore[attr-defined]
        if not isinstance(io, AtomicCheckpointIO):
            io = self._checkpoint_io = AtomicCheckpointIO(io)
        return io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Optional[CheckpointIO]) -> None:
        self._checkpoint_io = io

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        """The consensus model, so a checkpoint loads with plain ``LightningModule.load_from_checkpoint``.

        Runs on every rank when a checkpoint is saved, so the collective inside is matched.
        """
        assert self.lightning_module is not None
        if self.averager is None or self.world_size == 1 or not dist.is_initialized():
            return self.lightning_module.state_dict()
        with self.averager.consensus_swapped_in():
            return {k: v.detach().clone() for k, v in self.lightning_module.state_dict().items()}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Add every rank's own weights, gossip weight, optimizer state and schedule position, then write on rank 0.

        Messages in flight are stored with their receiver, so no weight mass is lost and resuming is exact.
        """
        if self.averager is not None and self.world_size > 1 and dist.is_initialized():
            assert self.lightning_module is not None
            # Saved during evaluation (ModelCheckpoint(save_on_train_epoch_end=False), val_check_interval < 1, ...):
            # the consensus is swapped in; store each rank's own weights, not the consensus.
            swapped = self._eval_stack is not None
            self._leave_consensus()
            if self.options.asynchronous:
                self.averager.finish()  # quiescence: the checkpoint is a consistent cut, nothing on the wire
            try:
                mine = {
                    "model": {k: v.detach().cpu().clone() for k, v in self.lightning_module.state_dict().items()},
                    "optimizer_states": [self.optimizer_state(opt) for opt in self.optimizers],
                    "gossip": self.averager.state_dict(),
                }
                everyone: Optional[list[Any]] = [None] * self.world_size if self.is_global_zero else None
                with collective_guard("the gather of every rank's state for a checkpoint"):
                    dist.gather_object(mine, everyone, dst=0)
            finally:
                if swapped:
                    self._enter_consensus()
            if self.is_global_zero:
                checkpoint = {**checkpoint, CHECKPOINT_KEY: {"world_size": self.world_size, "ranks": everyone}}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Resume each rank's own model and gossip state; onto a different number of workers, the consensus model.

        Same number of workers M: rank i gets back its own weights, gossip weight, messages that were in flight,
        schedule position, counters and (in :meth:`load_optimizer_state_dict`) optimizer state, so training goes on
        exactly as if it had not stopped.

        A different number of workers M': per-rank states cannot be mapped onto other ranks, so every rank starts from
        the checkpoint's consensus model (the exact weighted average of the M workers, in-flight messages included),
        with gossip weight 1/M', the optimizer state of the old rank 0, gossip counters at zero, and the gossip
        schedule going on from the checkpoint's step (a different schedule, since it depends on M'). A warning says so.
        """
        assert self.lightning_module is not None
        gossip = checkpoint.get(CHECKPOINT_KEY)
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if gossip is None or not fitting:
            check_checkpoint_fits(self.lightning_module, checkpoint["state_dict"], strict)
            super().load_model_state_dict(checkpoint, strict=strict)
            return
        if gossip["world_size"] != self.world_size:
            step = int(gossip["ranks"][0]["gossip"]["step"])
            rank_zero_warn(
                f"Resuming a gossip checkpoint written by {gossip['world_size']} workers with {self.world_size} "
                f"workers: per-rank states cannot be mapped onto a different number of workers, so every rank starts "
                f"from the checkpoint's consensus model (the exact weighted average of the {gossip['world_size']} "
                f"workers, in-flight messages included) with gossip weight 1/{self.world_size}, the optimizer state of "
                f"the old rank 0 and gossip counters at zero; the gossip schedule goes on from step {step}."
            )
            check_checkpoint_fits(self.lightning_module, checkpoint["state_dict"], strict)
            super().load_model_state_dict(checkpoint, strict=strict)
            self._resume_step = step
            return
        mine = gossip["ranks"][self.global_rank]
        check_checkpoint_fits(self.lightning_module, mine["model"], strict)
        self.lightning_module.load_state_dict(mine["model"], strict=strict)
        self._resume_state = mine["gossip"]

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        gossip = checkpoint.get(CHECKPOINT_KEY)
        if gossip is not None and gossip["world_size"] == self.world_size:
            checkpoint = {**checkpoint, "optimizer_states": gossip["ranks"][self.global_rank]["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        with collective_guard(f"Lightning's barrier {name!r}" if name else "a Lightning barrier"):
            super().barrier(name)

    @override
    def teardown(self) -> None:
        self._leave_consensus()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        for name, start_method in (("gossip", "popen"), ("gossip_spawn", "spawn"), ("gossip_fork", "fork")):
            strategy_registry.register(
                name,
                cls,
                description=f"GoSGD gossip strategy with `start_method` '{start_method}'",
                start_method=start_method,
            )
        strategy_registry.register(
            "gossip_async", cls, description="Asynchronous GoSGD gossip (no rank waits for another)", asynchronous=True
        )


# Importing this module registers the names (see lightning_gossip/_registration.py); a reload must not fail.
if "gossip" not in StrategyRegistry:
    GossipStrategy.register_strategies(StrategyRegistry)
