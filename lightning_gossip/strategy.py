"""GossipStrategy: Lightning's multi-process training with GoSGD gossip instead of DDP's gradient all-reduce.

A thin adapter. It reuses everything of :class:`~lightning.pytorch.strategies.DDPStrategy` that is about processes
(launchers, cluster environments, process groups, distributed samplers, metric reduction for logging) and replaces
what is about gradients: the model is never wrapped in ``DistributedDataParallel``; after every optimizer step a
:class:`~lightning_gossip.gossip.GossipAverager` runs the GoSGD step. The algorithm lives in
:mod:`lightning_gossip.gossip` and knows nothing of Lightning.
"""

from __future__ import annotations

import logging
import math
import os
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import timedelta
from typing import Any, Callable, Iterator, Literal, Mapping, Optional, Union

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
from lightning_gossip._adapter import (
    CHECKPOINT_KEY,
    AdapterCore,
    AveragerReadouts,
    destroy_process_group_at_exit,
    resumes_rank_by_rank,
)
from lightning_gossip._lightning_compat import (
    _is_local_file_protocol,
    make_sigterm_handler_local,
    uses_distributed_sampler,
)
from lightning_gossip.callbacks import GossipMonitor
from lightning_gossip.checkpoint_io import (
    AtomicCheckpointIO,
    check_checkpoint_fits,
    remove_leftovers,
    remove_old_parts,
)
from lightning_gossip.gossip import GossipAverager, GossipOptions, health
from lightning_gossip.gossip.averager import ExchangeFactory
from lightning_gossip.gossip.options import check_bool, check_optional_int, check_timeout
from lightning_gossip.gossip.outer import OUTER_STRATEGIES
from lightning_gossip.gossip.state import NO_FLOAT_TENSORS, gossiped_tensors
from lightning_gossip.gossip.topology import TopologyLike, validate_topology
from lightning_gossip.launchers import GossipMultiProcessingLauncher, GossipSubprocessScriptLauncher
from lightning_gossip.modes import refuse_trainer_peer_loss_survival
from lightning_gossip.trainer_modes import TrainerLockStep, trainer_mode_for

log = logging.getLogger(__name__)



class GossipStrategy(DDPStrategy, AveragerReadouts):
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
        asynchronous: GoSGD as published: no rank waits for another during an epoch (see docs/modes/asynchronous.md).
        outer_every: the outer optimizer (docs/outer.md): every this many steps every rank takes a Nesterov outer
            step (``outer_lr``, ``outer_momentum``, ``outer_nesterov``) from its slow weights, as DiLoCo does, then
            the ranks pair up at random and each pair averages its new slow weights (no all-reduce). ``None``: off.
            The registered names ``"gossip_outer"`` and ``"gossip_outer_async"`` have the recommended settings.
        verify: check gossip's invariants at every quiescent point, evaluation and checkpoint (mass, messages, the
            consensus unmoved by looking, every sample once per epoch); ``None`` reads ``LIGHTNING_GOSSIP_VERIFY``.
        on_peer_loss: only ``"fail"`` (a lost peer stops every rank with a ``GossipPeerError`` naming it). Surviving
            a lost peer (``"continue"``) is for the plain-torch averager only; the Trainer's own collectives over
            every rank would not survive it (see docs/reliability.md).
        monitor: add a :class:`~lightning_gossip.callbacks.GossipMonitor` (logs ``gossip/...``) if none is present.
        sigterm_sync_every: Lightning (>= 2.5) broadcasts rank 0's SIGTERM flag before every training step, a
            global synchronisation that ties every rank to every other each step and, on slow links, queues behind
            gossip messages. Gossip does it only every this many steps (so a SIGTERM still stops all ranks within
            that many steps); ``None`` never does.
        timeout: process-group timeout; a peer that stops answering turns into a :class:`GossipPeerError` naming
            it after this long instead of a hang (a peer that dies is usually reported at once).

    Reliability: every rank writes its own weights, gossip weight, in-flight messages and optimizer state as a part
    beside the main file (which holds the consensus model and stays the size of one model, whatever the number of
    workers); everything is written atomically (temporary file in the same directory, fsync, rename; the main file,
    which names the parts, last), so resuming with the same number of workers is exact and a crash while saving
    leaves the previous checkpoint intact. SIGTERM only raises a flag (no collective inside the signal handler, which
    could land inside a save's collectives and deadlock): each rank stops at its next step boundary, with exit
    code 143. Resuming with a different number
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
        outer_every: Optional[int] = None,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        outer_nesterov: bool = True,
        verify: Optional[bool] = None,
        on_peer_loss: Literal["fail"] = "fail",
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
            outer_every=outer_every,
            outer_lr=outer_lr,
            outer_momentum=outer_momentum,
            outer_nesterov=outer_nesterov,
            verify=verify,
        )
        refuse_trainer_peer_loss_survival(on_peer_loss)
        self.monitor = check_bool("monitor", monitor)
        self.sigterm_sync_every = check_optional_int("sigterm_sync_every", sigterm_sync_every, minimum=1, unit="steps")
        check_timeout(timeout)
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
        self.core = AdapterCore(self.options, self.exchange_factory)
        self.mode: TrainerLockStep = trainer_mode_for(self.options)

    # -- read-outs ------------------------------------------------------------------------------------------------
    @property
    def averager(self) -> Optional[GossipAverager]:
        """The :class:`~lightning_gossip.gossip.GossipAverager` of the current fit (``None`` before setup)."""
        return self.core.averager

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
        if trainer is not None and self._fitting(trainer):
            self.mode.check_before_launch(trainer)
        module = trainer.lightning_module if trainer is not None else None
        if module is None or trainer.state.fn != TrainerFn.FITTING or is_overridden("configure_model", module):
            return  # a model built in `configure_model` only gets its tensors after the launch
        if not gossiped_tensors(module, self.options.mix_buffers):
            raise ValueError(f"{NO_FLOAT_TENSORS} (model: {type(module).__name__}).")

    def _consensus_for_results(self, trainer: "pl.Trainer") -> AbstractContextManager:
        """The spawn launcher hands rank 0's module back to the parent: make that the consensus model."""
        if trainer.state.fn != TrainerFn.FITTING:
            return nullcontext()
        return self.core.consensus_swapped_in()

    @override
    def on_exception(self, exception: BaseException) -> None:
        """A failed rank 0 stops the worker processes it launched, so none is left waiting for it.

        Lightning already does the reverse (its process observer kills everything when a worker exits with an
        error); without this, the workers of a failed launcher would wait for it until the process-group timeout.
        """
        super().on_exception(exception)
        self.core.leave_consensus(failed=True)
        self.core.abort()  # other ranks may be gone: no collective (asynchronous: its daemon threads stay)
        if isinstance(self._launcher, GossipSubprocessScriptLauncher):
            self._launcher.stop_children()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        module = self.lightning_module
        if module is not None and module._trainer is not None:
            make_sigterm_handler_local(module.trainer)
        destroy_process_group_at_exit()
        health.start()  # heartbeats and the hang watchdog (armed by the averager while training)
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
        averager = self.averager
        kept = averager.state.flatten() if averager is not None and not self._fitting(trainer) else None
        super().setup(trainer)
        if kept is not None:
            assert averager is not None
            averager.refresh_tensors()  # model_to_device may have replaced buffer tensors
            averager.state.load_flat(kept)
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
        self.mode = trainer_mode_for(self.options)  # a fresh one per fit: nothing of an earlier fit carries over
        self.core.build_averager(self.lightning_module)
        self.mode.setup_fit(self, self.lightning_module.trainer)

    # -- collectives: posted on the step board, checked by the mode, a lost rank named -----------------------------
    @contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        self.mode.refuse_collective(what)
        with self.core.collective(what):
            yield

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        with self._collective(f"a broadcast from rank {src} (e.g. ModelCheckpoint's decision)"):
            return super().broadcast(obj, src=src)

    @override
    def reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        with self._collective("A reduction over ranks (self.log(..., sync_dist=True))"):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: torch.Tensor, group: Optional[Any] = None, sync_grads: bool = False) -> torch.Tensor:
        with self._collective("An all-gather over ranks (self.all_gather)"):
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        with self._collective(f"Lightning's barrier {name!r}" if name else "a Lightning barrier"):
            super().barrier(name)

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
    def on_train_start(self) -> None:
        assert self.lightning_module is not None
        self.mode.on_train_start(self, self.lightning_module.trainer)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self.lightning_module is not None
        self.mode.on_train_batch_start(self, self.lightning_module.trainer)

    def batches_per_epoch_of_every_rank(self) -> Optional[list[int]]:
        """Every rank's number of training batches per epoch (-1: unknown, an iterable), gathered; None when not
        gossiping."""
        if self.averager is None or self.world_size == 1 or not dist.is_initialized():
            return None
        batches = self.lightning_module.trainer.num_training_batches  # type: ignore[union-attr]
        mine = torch.tensor([int(batches) if math.isfinite(batches) else -1], dtype=torch.int64,
                            device=self.root_device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        with self.core.collective("the check that every rank's epoch has as many batches"):
            dist.all_gather(everyone, mine)
        return [int(t.item()) for t in everyone]

    @override
    def on_train_end(self) -> None:
        if self.averager is not None:
            with self.core.collective("the end of training (drain, step-count check, final consensus)"):
                self.averager.end()

    @override
    def process_dataloader(self, dataloader: Any) -> Any:
        dataloader = super().process_dataloader(dataloader)
        trainer = self.lightning_module.trainer if self.lightning_module is not None else None
        if trainer is None or not trainer.training or not uses_distributed_sampler(trainer):
            return dataloader  # evaluation data keeps equal shards; use_distributed_sampler=False: the user's
        return self.mode.training_dataloader(dataloader, self.core.seed, self.world_size)

    # -- evaluation -----------------------------------------------------------------------------------------------
    @override
    def on_validation_start(self) -> None:
        self.core.enter_consensus()

    @override
    def on_validation_end(self) -> None:
        self.core.leave_consensus()

    @override
    def on_test_start(self) -> None:
        self.core.enter_consensus()

    @override
    def on_test_end(self) -> None:
        self.core.leave_consensus()

    @override
    def on_predict_start(self) -> None:
        self.core.enter_consensus()

    @override
    def on_predict_end(self) -> None:
        self.core.leave_consensus()

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
        if not self.core.gossiping():
            return self.lightning_module.state_dict()
        with self.core.collective("the consensus for a checkpoint"), self.core.consensus_swapped_in():
            return {k: v.detach().clone() for k, v in self.lightning_module.state_dict().items()}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Every rank writes its own part (weights, optimizer state, gossip weight, schedule position, messages in
        flight) beside the main file; then rank 0 writes the main file, a plain Lightning checkpoint of the consensus
        model that names the parts (see :meth:`AdapterCore.save`)."""
        if not self.core.gossiping():
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        assert self.lightning_module is not None
        # Saved during evaluation (ModelCheckpoint(save_on_train_epoch_end=False), ...): the consensus is swapped
        # in; store each rank's own weights, not the consensus.
        swapped = self.core.evaluating_consensus
        self.core.leave_consensus()
        try:
            gossip = self.core.own_gossip_state()  # first: asynchronous messages home, a consistent cut
            mine = {
                "model": {k: v.detach().cpu().clone() for k, v in self.lightning_module.state_dict().items()},
                "optimizer_states": [self.optimizer_state(opt) for opt in self.optimizers],
                CHECKPOINT_KEY: gossip,
            }
        finally:
            if swapped:
                self.core.enter_consensus()
        # Every rank writes its part next to rank 0's file (the same path everywhere, whatever a callback passed).
        with self.core.collective("the broadcast of a checkpoint's path"):
            path = super().broadcast(os.fspath(filepath))
        self.core.save(
            path,
            mine,
            write_part=lambda own, part: self.checkpoint_io.save_checkpoint(dict(own), part),
            write_main=lambda entry: super(GossipStrategy, self).save_checkpoint(
                {**checkpoint, CHECKPOINT_KEY: entry}, path, storage_options=storage_options
            ),
            remove_old_parts=remove_old_parts if _is_local_file_protocol(path) else None,
            remove_leftovers=remove_leftovers if self.checkpoint_io.writes_local_files_at_once(path, storage_options)
            else None,
        )

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """The main file, plus this rank's part when resuming a fit onto the same number of workers."""
        # Lightning < 2.5 has no `weights_only` here (nor in TorchCheckpointIO): pass it only when it is given
        extra = {} if weights_only is None else {"weights_only": weights_only}
        checkpoint = super().load_checkpoint(checkpoint_path, **extra)
        gossip = checkpoint.get(CHECKPOINT_KEY)
        module = self.lightning_module
        fitting = module is not None and module._trainer is not None and self._fitting(module.trainer)
        own_part = isinstance(gossip, dict) and "parts" in gossip and resumes_rank_by_rank(gossip, self.world_size)
        if fitting and own_part:
            checkpoint[CHECKPOINT_KEY] = {
                **gossip, "mine": self.core.load_own_part(self.checkpoint_io, os.fspath(checkpoint_path), gossip, **extra)
            }
        return checkpoint

    @staticmethod
    def _own_state(gossip: Mapping[str, Any], rank: int) -> Mapping[str, Any]:
        """This rank's saved state: its part, or (checkpoints written before per-rank parts) its entry in the list."""
        return gossip["mine"] if "mine" in gossip else gossip["ranks"][rank]

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Resume each rank's own model and gossip state; onto a different number of workers, the consensus model.

        Same number of workers M: rank i gets back its own weights, gossip weight, messages that were in flight,
        schedule position, counters and (in :meth:`load_optimizer_state_dict`) optimizer state, so training goes on
        exactly as if it had not stopped. A different number of workers M': every rank starts from the checkpoint's
        consensus model (the exact weighted average of the M workers, in-flight messages included), with gossip weight
        1/M', the optimizer state of the old rank 0, gossip counters at zero, and the gossip schedule going on from
        the checkpoint's step (a different schedule, since it depends on M'). A warning says so.
        """
        assert self.lightning_module is not None
        gossip = checkpoint.get(CHECKPOINT_KEY)
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        if gossip is None or not fitting or not resumes_rank_by_rank(gossip, self.world_size):
            check_checkpoint_fits(self.lightning_module, checkpoint["state_dict"], strict)
            super().load_model_state_dict(checkpoint, strict=strict)
            if gossip is not None and fitting:
                self.core.resume(self.core.plan_resume(gossip, None, self.world_size))
            return
        mine = self._own_state(gossip, self.global_rank)
        check_checkpoint_fits(self.lightning_module, mine["model"], strict)
        self.lightning_module.load_state_dict(mine["model"], strict=strict)
        self.core.resume(self.core.plan_resume(gossip, mine, self.world_size))

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        gossip = checkpoint.get(CHECKPOINT_KEY)
        if gossip is not None and resumes_rank_by_rank(gossip, self.world_size):
            mine = self._own_state(gossip, self.global_rank)
            checkpoint = {**checkpoint, "optimizer_states": mine["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)

    @override
    def teardown(self) -> None:
        self.core.leave_consensus(failed=True)
        self.mode.teardown()
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
        for name, (description, settings) in OUTER_STRATEGIES.items():  # "gossip_outer", "gossip_outer_async"
            strategy_registry.register(name, cls, description=description, **settings)


# Importing this module registers the names (see lightning_gossip/_registration.py); a reload must not fail.
if "gossip" not in StrategyRegistry:
    GossipStrategy.register_strategies(StrategyRegistry)
