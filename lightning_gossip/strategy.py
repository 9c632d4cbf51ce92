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
import socket
import uuid
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
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
from lightning_gossip import async_support
from lightning_gossip.callbacks import GossipMonitor
from lightning_gossip._lightning_compat import (
    _is_local_file_protocol,
    make_sigterm_handler_local,
    throttle_sigterm_broadcast,
)
from lightning_gossip.checkpoint_io import (
    AtomicCheckpointIO,
    _process_alive,
    check_checkpoint_fits,
    part_path,
    parts_root,
    remove_old_parts,
)
from lightning_gossip._adapter import CHECKPOINT_KEY, AveragerReadouts, destroy_process_group_at_exit
from lightning_gossip.gossip import GossipAverager, GossipOptions
from lightning_gossip.gossip.averager import ExchangeFactory
from lightning_gossip.gossip.errors import GossipPeerError, GossipScheduleError, collective_guard, peer_lost_error
from lightning_gossip.gossip.options import check_bool, check_optional_int, check_timeout
from lightning_gossip.gossip.outer import OUTER_DESCRIPTION, RECOMMENDED_OUTER
from lightning_gossip.gossip.state import NO_FLOAT_TENSORS, gossiped_tensors
from lightning_gossip.gossip.topology import TopologyLike, validate_topology
from lightning_gossip.launchers import GossipMultiProcessingLauncher, GossipSubprocessScriptLauncher

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
        asynchronous: GoSGD as published: no rank waits for another during an epoch (see the README).
        outer_every: the outer optimizer (docs/outer.md): every this many steps the ranks pair up at random, each
            pair averages its models and every rank takes a Nesterov outer step (``outer_lr``, ``outer_momentum``,
            ``outer_nesterov``) from its slow weights, as DiLoCo does with an all-reduce. ``None``: off. The
            registered name ``"gossip_outer"`` has the recommended settings.
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
        )
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
        module = self.lightning_module
        if module is not None and module._trainer is not None:
            make_sigterm_handler_local(module.trainer)
        destroy_process_group_at_exit()
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
        self._register_processes()
        trainer = self.lightning_module.trainer
        if self.options.asynchronous:
            # Ranks take different numbers of steps: no per-step broadcast, a stop flag in the store instead.
            async_support.setup_fit(self, trainer)
            return
        # The gossip step count is the same on every rank before each training step, so the broadcast stays a
        # matched collective.
        every = self.sigterm_sync_every
        throttle_sigterm_broadcast(trainer, lambda: every is not None and self.gossip_step % every == 0)

    # -- naming a lost rank -----------------------------------------------------------------------------------------
    def _register_processes(self) -> None:
        """Every rank's (host, pid), gathered once at setup: a failed collective can then name the ranks that are gone
        (on this host) instead of "one of ranks 1, 2, 3"."""
        self._processes: list[tuple[str, int]] = []
        if self.world_size == 1 or not dist.is_initialized():
            return
        everyone: list[Any] = [None] * self.world_size
        with collective_guard("the exchange of every rank's process id at setup"):
            dist.all_gather_object(everyone, (socket.gethostname(), os.getpid()))
        self._processes = [(str(host), int(pid)) for host, pid in everyone]

    def _gone_ranks(self) -> list[int]:
        host = socket.gethostname()
        return [rank for rank, (rank_host, pid) in enumerate(getattr(self, "_processes", []))
                if rank != self.global_rank and rank_host == host and not _process_alive(pid)]

    @contextmanager
    def _naming_lost_ranks(self, what: str) -> Iterator[None]:
        """Around a collective: a failure becomes a :class:`GossipPeerError` that names the ranks whose processes are
        gone, where this rank can see them (same host); otherwise the error is left as it is."""
        try:
            with collective_guard(what):
                yield
        except GossipPeerError as error:
            gone = self._gone_ranks()
            if not gone or set(error.peers) == set(gone):
                raise
            # chained to the backend's error, not to the vaguer one ("one of ranks ...") it replaces
            cause = error.__cause__ or error
            raise peer_lost_error(self.global_rank, gone, what, cause) from cause

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        with self._naming_lost_ranks(f"a broadcast from rank {src} (e.g. ModelCheckpoint's decision)"):
            return super().broadcast(obj, src=src)

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
        self._check_same_batches_per_epoch()

    def _check_same_batches_per_epoch(self) -> None:
        """Raise :class:`GossipScheduleError` on every rank, before the first step, if the ranks' epochs differ in
        length (uneven shards): gossip pairs ranks by step number, and a rank whose epoch ends first would otherwise
        wait in another collective than its peers until the process-group timeout."""
        if self.averager is None or self.world_size == 1 or self.options.asynchronous or not dist.is_initialized():
            return
        trainer = self.lightning_module.trainer  # type: ignore[union-attr]
        batches = trainer.num_training_batches
        mine = torch.tensor([int(batches) if math.isfinite(batches) else -1], dtype=torch.int64,
                            device=self.root_device)
        everyone = [torch.zeros_like(mine) for _ in range(self.world_size)]
        with self._naming_lost_ranks("the check that every rank's epoch has as many batches"):
            dist.all_gather(everyone, mine)
        counts = [int(t.item()) for t in everyone]
        if len(set(counts)) > 1:
            described = ", ".join(f"rank {r}: {'unknown (iterable)' if c < 0 else c}" for r, c in enumerate(counts))
            raise GossipScheduleError(
                f"Ranks would take different numbers of training batches per epoch ({described}). Gossip pairs ranks "
                "by step number, so every rank must take the same number of steps: give every rank a shard of the "
                "same length (Lightning's DistributedSampler pads them; keep `use_distributed_sampler=True` or shard "
                "evenly yourself), or cap the epoch with `limit_train_batches`."
            )

    @override
    def on_train_end(self) -> None:
        if self.averager is not None:
            with self._naming_lost_ranks("the end of training (drain, step-count check, final consensus)"):
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
        with self._naming_lost_ranks("the reduction of a logged value (sync_dist)"):
            return super().reduce(tensor, group=group, reduce_op=reduce_op)

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _enter_consensus(self) -> None:
        if self.options.eval_mode != "consensus" or self.averager is None or self.world_size == 1:
            return
        if self._eval_stack is None:
            self._eval_stack = ExitStack()
            with self._naming_lost_ranks("the consensus for evaluation"):
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
        with self._naming_lost_ranks("the consensus for a checkpoint"), self.averager.consensus_swapped_in():
            return {k: v.detach().clone() for k, v in self.lightning_module.state_dict().items()}

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Optional[Any] = None
    ) -> None:
        """Every rank writes its own part (weights, optimizer state, gossip weight, schedule position, messages in
        flight) beside the main file; then rank 0 writes the main file, a plain Lightning checkpoint of the consensus
        model that names the parts.

        What rank 0 holds and writes does not grow with the number of workers. The parts go to
        ``<file>.parts/<save id>/rank<r>.pt`` with a fresh id per save, recorded in the main file, which is replaced
        last (atomically): a crash at any moment leaves the previous checkpoint complete, parts included. The parts
        of earlier saves are removed after. Assumes, as Lightning's resume does, that every rank sees the folder.
        """
        if self.averager is None or self.world_size == 1 or not dist.is_initialized():
            super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
            return
        assert self.lightning_module is not None
        # Saved during evaluation (ModelCheckpoint(save_on_train_epoch_end=False), val_check_interval < 1, ...): the
        # consensus is swapped in; store each rank's own weights, not the consensus.
        swapped = self._eval_stack is not None
        self._leave_consensus()
        try:
            gossip = self.averager.checkpoint_state_dict()  # first: asynchronous messages home, a consistent cut
            mine = {
                "model": {k: v.detach().cpu().clone() for k, v in self.lightning_module.state_dict().items()},
                "optimizer_states": [self.optimizer_state(opt) for opt in self.optimizers],
                "gossip": gossip,
            }
        finally:
            if swapped:
                self._enter_consensus()
        path = os.fspath(filepath)
        if self.options.asynchronous:
            # ModelCheckpoint names the file after each rank's own global_step, which differs between ranks in
            # asynchronous mode: every rank writes its part next to rank 0's file.
            path = filepath = self.broadcast(path)
        save_id = self._fresh_save_id()
        relative = os.path.join(os.path.basename(parts_root(path)), save_id)
        self.checkpoint_io.save_checkpoint(mine, part_path(path, relative, self.global_rank))
        del mine
        with self._naming_lost_ranks("the barrier after every rank wrote its checkpoint part"):
            dist.barrier()  # every part is on disk before the main file names them
        if self.is_global_zero:
            gossip = {"world_size": self.world_size, "step": self.gossip_step, "parts": relative, "save_id": save_id}
            super().save_checkpoint({**checkpoint, CHECKPOINT_KEY: gossip}, filepath, storage_options=storage_options)
            if _is_local_file_protocol(path):
                remove_old_parts(path, save_id)

    def _fresh_save_id(self) -> str:
        """A random id from rank 0, the same on every rank (not from torch's generator: training stays bitwise
        the same with or without saving)."""
        code = torch.tensor(list(uuid.uuid4().bytes) if self.is_global_zero else [0] * 16, dtype=torch.uint8,
                            device=self.root_device)
        with self._naming_lost_ranks("the broadcast of a checkpoint's save id"):
            dist.broadcast(code, src=0)
        return bytes(code.cpu().tolist()).hex()

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """The main file, plus this rank's part when resuming a fit onto the same number of workers."""
        # Lightning < 2.5 has no `weights_only` here (nor in TorchCheckpointIO): pass it only when it is given
        extra = {} if weights_only is None else {"weights_only": weights_only}
        checkpoint = super().load_checkpoint(checkpoint_path, **extra)
        gossip = checkpoint.get(CHECKPOINT_KEY)
        module = self.lightning_module
        fitting = module is not None and module._trainer is not None and self._fitting(module.trainer)
        if isinstance(gossip, dict) and "parts" in gossip and fitting and gossip["world_size"] == self.world_size:
            part = part_path(os.fspath(checkpoint_path), gossip["parts"], self.global_rank)
            if not os.path.exists(part) and _is_local_file_protocol(part):
                raise FileNotFoundError(
                    f"The checkpoint {os.fspath(checkpoint_path)} names rank {self.global_rank}'s part {part}, which "
                    f"does not exist: copy the folder {parts_root(os.fspath(checkpoint_path))} along with the file. "
                    f"(Without parts, resuming onto a different number of workers starts from the consensus model.)"
                )
            checkpoint[CHECKPOINT_KEY] = {**gossip, "mine": self.checkpoint_io.load_checkpoint(part, **extra)}
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
            step = int(gossip["step"]) if "step" in gossip else int(gossip["ranks"][0]["gossip"]["step"])
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
        mine = self._own_state(gossip, self.global_rank)
        check_checkpoint_fits(self.lightning_module, mine["model"], strict)
        self.lightning_module.load_state_dict(mine["model"], strict=strict)
        self._resume_state = mine["gossip"]

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        gossip = checkpoint.get(CHECKPOINT_KEY)
        if gossip is not None and gossip["world_size"] == self.world_size:
            mine = self._own_state(gossip, self.global_rank)
            checkpoint = {**checkpoint, "optimizer_states": mine["optimizer_states"]}
        super().load_optimizer_state_dict(checkpoint)

    @override
    def barrier(self, name: Optional[str] = None) -> None:
        with self._naming_lost_ranks(f"Lightning's barrier {name!r}" if name else "a Lightning barrier"):
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
        strategy_registry.register("gossip_outer", cls, description=OUTER_DESCRIPTION, **RECOMMENDED_OUTER)


# Importing this module registers the names (see lightning_gossip/_registration.py); a reload must not fail.
if "gossip" not in StrategyRegistry:
    GossipStrategy.register_strategies(StrategyRegistry)
