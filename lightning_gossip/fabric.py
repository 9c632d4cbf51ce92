"""GossipFabricStrategy: GoSGD gossip for Lightning Fabric, so a hand-written Fabric loop trains without all-reduce.

The Fabric counterpart of :class:`~lightning_gossip.strategy.GossipStrategy`: a subclass of Fabric's
``DDPStrategy`` that keeps everything about processes (launchers, cluster environments, process groups, distributed
samplers, collectives) and never wraps the model in ``DistributedDataParallel``. The options are the same
:class:`~lightning_gossip.gossip.GossipOptions` and the algorithm is the same
:class:`~lightning_gossip.gossip.GossipAverager`; this module only connects them to Fabric's seams:

- ``fabric.setup(model, optimizer)`` -> :meth:`setup_module` builds the averager (rank 0's weights broadcast,
  a_i = 1/M);
- ``optimizer.step()`` -> :meth:`optimizer_step`: the optimizer step, then the gossip step;
- ``fabric.save`` / ``fabric.load`` -> :meth:`save_checkpoint` / :meth:`load_checkpoint`: the saved model entry is the
  consensus (loadable without gossip); every rank writes its own weights, optimizer state and gossip state as a
  part beside the file (the Trainer strategy's format), so a resume with the same number of processes is exact and
  rank 0's bytes do not grow with the number of processes.

What both adapters share (building the averager, the resume plan, the evaluation swap, the checkpoint format) is in
:mod:`lightning_gossip._adapter`; what differs between the modes (work sharing) in :mod:`lightning_gossip.modes`.
This module imports only ``lightning.fabric`` (it is imported when Fabric is, to register the strategy names).
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any, Callable, Literal, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.accelerators import Accelerator
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, Precision
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import STRATEGY_REGISTRY, DDPStrategy
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_gossip._adapter import (
    CHECKPOINT_KEY,
    AdapterCore,
    AveragerReadouts,
    destroy_process_group_at_exit,
    resumes_rank_by_rank,
)
from lightning_gossip.gossip import GossipAverager, GossipOptions, health
from lightning_gossip.gossip.averager import ExchangeFactory
from lightning_gossip.gossip.options import check_timeout
from lightning_gossip.gossip.outer import OUTER_STRATEGIES
from lightning_gossip.gossip.topology import TopologyLike, validate_topology
from lightning_gossip.modes import LockStep, mode_for


class _NothingToSkip:
    """Fabric's ``no_backward_sync`` seam: gossip has no gradient all-reduce, so gradient accumulation needs no
    synchronisation skipped (Fabric would otherwise warn that the strategy cannot skip it)."""

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> AbstractContextManager:
        return nullcontext()


class GossipFabricStrategy(DDPStrategy, AveragerReadouts):
    """Decentralized data-parallel training with GoSGD (sum-weight gossip) for Lightning Fabric.

    Takes the gossip options of :class:`~lightning_gossip.GossipStrategy` (``p``, ``topology``, ``seed``,
    ``mix_buffers``, ``overlap``, ``staleness``, ``average_every``, ``transfer_dtype``, ``eval_mode``,
    ``final_consensus``, ``on_nonfinite``, ``asynchronous``, ``outer_every``, ``outer_lr``, ``outer_momentum``,
    ``outer_nesterov``, ``verify``; see docs/options.md), checked once by
    :class:`~lightning_gossip.gossip.GossipOptions`, and Fabric's ``DDPStrategy`` arguments. Trainer-only options
    (``monitor``, ``sigterm_sync_every``) have no Fabric counterpart: Fabric has no callbacks of ours to add and no
    per-step SIGTERM broadcast.

    In the loop: ``optimizer.step()`` runs the gossip step, so every rank must take the same number of optimizer
    steps (``fabric.setup_dataloaders`` gives each rank an equal-length shard). One model is gossiped, with one
    optimizer. After the loop call :meth:`end` (steps compared, messages home, the exact consensus on every rank if
    ``final_consensus``), or :meth:`consensus_` whenever every rank should hold the exact average. Evaluate inside
    ``with fabric.strategy.evaluating():`` to see the model ``eval_mode`` names (the consensus by default).
    """

    strategy_name = "gossip"
    #: as :attr:`GossipStrategy.exchange_factory`: ``None`` picks the library's exchange.
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
        on_peer_loss: Literal["fail", "continue"] = "fail",
        accelerator: Optional[Accelerator] = None,
        parallel_devices: Optional[list[torch.device]] = None,
        cluster_environment: Optional[ClusterEnvironment] = None,
        checkpoint_io: Optional[CheckpointIO] = None,
        precision: Optional[Precision] = None,
        process_group_backend: Optional[str] = None,
        timeout: Optional[timedelta] = default_pg_timeout,
        start_method: Literal["popen", "spawn", "fork", "forkserver"] = "popen",
    ) -> None:
        # Every option is checked here, once (the same checks as the Trainer strategy), before any process starts.
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
            on_peer_loss=on_peer_loss,
        )
        check_timeout(timeout)
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=cluster_environment,
            checkpoint_io=checkpoint_io,
            precision=precision,
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
        )
        self._backward_sync_control = _NothingToSkip()
        self.core = AdapterCore(self.options, self.exchange_factory)
        self.mode: LockStep = mode_for(self.options)
        self._optimizers: list[Optimizer] = []

    @property
    def averager(self) -> Optional[GossipAverager]:
        """The :class:`~lightning_gossip.gossip.GossipAverager` (``None`` before ``fabric.setup(model, ...)``)."""
        return self.core.averager

    # -- launching and setup --------------------------------------------------------------------------------------
    @override
    def _configure_launcher(self) -> None:
        # The world size is known here, before any process is started: reject a topology that cannot work now.
        validate_topology(self.options.topology, self.num_nodes * self.num_processes)
        if self.options.on_peer_loss == "continue":
            refuse_killing_launcher(self.cluster_environment)
        super()._configure_launcher()

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        destroy_process_group_at_exit()
        health.start()  # heartbeats and the hang watchdog (armed by the averager while training)
        if self.world_size == 1:
            rank_zero_warn(
                "GossipFabricStrategy runs with a single process (world size 1): nothing is gossiped. Use devices>1 "
                "or num_nodes>1 to gossip."
            )

    @override
    def setup_module(self, module: nn.Module) -> nn.Module:
        """No ``DistributedDataParallel`` (that is where DDP's gradient all-reduce lives): set up the averager.

        A collective: every rank broadcasts/receives rank 0's initial weights and checks that the models match.
        """
        if self.averager is not None:
            if module is self.averager.module:
                return module
            raise RuntimeError(
                "GossipFabricStrategy gossips one model, and one was set up already "
                f"({type(self.averager.module).__name__}); set up the model to train once with fabric.setup(model, "
                "optimizer)."
            )
        self.core.build_averager(module)
        return module

    @override
    def setup_optimizer(self, optimizer: Optimizer) -> Optimizer:
        if self._optimizers and optimizer is not self._optimizers[0]:
            raise RuntimeError(
                "GossipFabricStrategy takes one gossip step per optimizer.step(), so it needs exactly one optimizer "
                "(parameter groups can give parts of the model their own settings)."
            )
        self._optimizers = [optimizer]
        return optimizer

    def share_work(self, dataloader: DataLoader) -> DataLoader:
        """The training ``dataloader`` shared out dynamically between the ranks (asynchronous mode only): fast ranks
        take more batches, every sample is used exactly once per epoch over all ranks. Pass the result to
        ``fabric.setup_dataloaders(...)``; the loop then ends an epoch when the shared data runs out (the loader has
        no length), so nothing in the epoch may need every rank at the same step.
        """
        return self.mode.share_work(dataloader, self.core.seed, self.world_size, survivors=self._survivors)

    def _survivors(self) -> Any:
        # with on_peer_loss="continue", the run's membership (the sampler re-queues a lost rank's unfinished data)
        return self.averager.survivors if self.averager is not None else None

    @override
    def process_dataloader(self, dataloader: DataLoader) -> DataLoader:
        dataloader = super().process_dataloader(dataloader)
        # A work-sharing loader (share_work) that Fabric wrapped in its distributed sampler is unwrapped again.
        return self.mode.training_dataloader(dataloader, self.core.seed, self.world_size,
                                             survivors=self._survivors) if _shares_work(dataloader) else dataloader

    # -- training -------------------------------------------------------------------------------------------------
    @override
    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        output = super().optimizer_step(optimizer, **kwargs)
        if self.averager is not None:
            self.averager.step()
        return output

    def consensus_(self) -> float:
        """Put the exact weighted average on every rank (a_i = 1/M); returns the consensus distance it removed.

        A collective: every rank must call it.
        """
        averager = self._require_averager("consensus_()")
        with self.core.collective("consensus_()"):
            return averager.consensus_()

    def consensus_distance(self) -> float:
        """(1/M) sum_i ||x_i - x_bar||^2 over all ranks (a collective)."""
        averager = self._require_averager("consensus_distance()")
        with self.core.collective("consensus_distance()"):
            return averager.consensus_distance()

    def consensus_swapped_in(self) -> AbstractContextManager:
        """Hold the exact consensus temporarily (to evaluate or save it), then this rank's own weights again."""
        return self._require_averager("consensus_swapped_in()").consensus_swapped_in()

    def evaluating(self) -> AbstractContextManager:
        """Evaluate the model ``eval_mode`` names: the exact consensus (``"consensus"``) or this rank's own
        (``"local"``). A collective in consensus mode: every rank must enter it."""
        return self.core.evaluating()

    def end(self, consensus: Optional[bool] = None) -> None:
        """After the loop: check that every rank took as many steps (lock-step), bring every message home, put the
        exact consensus on every rank (``consensus``, default ``final_consensus``) and release message buffers and
        threads. A collective: every rank must call it.
        """
        averager = self._require_averager("end()")
        with self.core.collective("end() (step-count check, messages home, final consensus)"):
            averager.end(consensus)

    def _require_averager(self, what: str) -> GossipAverager:
        if self.averager is None:
            raise RuntimeError(f"fabric.strategy.{what} needs the model set up first: model, optimizer = "
                               "fabric.setup(model, optimizer).")
        return self.averager

    # -- collectives through Fabric: posted on the step board, a lost rank named -----------------------------------
    # With on_peer_loss="continue" they run over the ranks still alive (a group of exactly them, agreed through the
    # store), again over the new survivors if one is lost meanwhile: a mean is then the survivors' mean, a gather has
    # one entry per survivor. A collective over a group of the caller's own is left to the caller.
    @override
    def all_reduce(self, tensor: Any, group: Optional[Any] = None, reduce_op: Optional[Any] = "mean") -> Any:
        if _default_group(group) and self.core.surviving():
            # Each try reduces a copy (a try cut short by a loss must not have touched the input); the result then
            # goes into the input, which Fabric's all_reduce changes in place.
            source = tensor.detach().clone() if isinstance(tensor, torch.Tensor) else tensor
            result = self.core.among_survivors("fabric.all_reduce", lambda survivors: DDPStrategy.all_reduce(
                self, _copy(source), group=survivors, reduce_op=reduce_op))
            if isinstance(tensor, torch.Tensor):
                with torch.no_grad():
                    tensor.copy_(result)
                return tensor
            return result
        with self.core.collective("fabric.all_reduce"):
            return super().all_reduce(tensor, group=group, reduce_op=reduce_op)

    @override
    def all_gather(self, tensor: Any, group: Optional[Any] = None, sync_grads: bool = False) -> Any:
        if _default_group(group) and self.core.surviving():
            return self.core.among_survivors("fabric.all_gather", lambda survivors: DDPStrategy.all_gather(
                self, tensor, group=survivors, sync_grads=sync_grads))
        with self.core.collective("fabric.all_gather"):
            return super().all_gather(tensor, group=group, sync_grads=sync_grads)

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        what = f"fabric.broadcast from rank {src}"
        if self.core.surviving():
            return self.core.among_survivors(what, lambda survivors: _broadcast_object(obj, src, survivors, what))
        with self.core.collective(what):
            return super().broadcast(obj, src=src)

    def broadcast_from_survivor(self, obj: Any) -> Any:
        """``obj`` of the lowest rank still alive, on every rank (``on_peer_loss="continue"``; otherwise rank 0's, as
        ``fabric.broadcast(obj, src=0)``). The source is chosen inside the agreement, so every rank uses the same one
        even when ranks differ on who was alive when they called."""
        if self.core.surviving():
            return self.core.among_survivors("fabric.strategy.broadcast_from_survivor()", lambda survivors:
                                             _broadcast_object(obj, None, survivors, "a broadcast from a survivor"))
        return self.broadcast(obj, src=0)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        if self.core.surviving():
            self.core.among_survivors("fabric.barrier", lambda survivors: None)  # its agreements wait for everyone
            return
        with self.core.collective("fabric.barrier"):
            super().barrier(*args, **kwargs)

    # -- checkpoints ----------------------------------------------------------------------------------------------
    @property  # type: ignore[override]
    def checkpoint_io(self) -> CheckpointIO:
        """The user's (or Fabric's default) ``CheckpointIO``, wrapped so local files are written atomically."""
        from lightning_gossip.checkpoint_io import AtomicCheckpointIO  # imports Lightning's trainer side: lazily

        io = DDPStrategy.checkpoint_io.fget(self)  # type: ignore[attr-defined]
        if not isinstance(io, AtomicCheckpointIO):
            io = self._checkpoint_io = AtomicCheckpointIO(io)
        return io

    @checkpoint_io.setter
    def checkpoint_io(self, io: Optional[CheckpointIO]) -> None:
        self._checkpoint_io = io

    @override
    def save_checkpoint(
        self,
        path: Any,
        state: dict[str, Union[nn.Module, Optimizer, Any]],
        storage_options: Optional[Any] = None,
        filter: Optional[dict[str, Callable[[str, Any], bool]]] = None,
    ) -> None:
        """Save the consensus under the model's key, and every rank's own state as a part beside the file.

        The model's entry is the exact weighted average of all ranks (messages in flight counted), so the file
        loads into a plain model without gossip. Every rank writes its own model and optimizer entries and gossip
        state (weight, schedule position, messages in flight) to ``<path>.parts/<save id>/rank<r>.pt``; the file,
        written last by rank 0, names them under ``"gossip"``. A collective: every rank must call it with the same
        path (``fabric.save`` does), on a filesystem every rank sees.
        """
        if not self.core.gossiping():
            super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)
            return
        if CHECKPOINT_KEY in state:
            raise ValueError(f"GossipFabricStrategy stores the gossip state under {CHECKPOINT_KEY!r} in the "
                             "checkpoint; use another key for your own entry.")
        from lightning_gossip.checkpoint_io import remove_leftovers, remove_old_parts

        filter = filter or {}
        # First: in asynchronous mode this brings the messages on the wire home, so the weights read below and the
        # gossip weights are one consistent cut (their mass sums to one).
        mine: dict[str, Any] = {CHECKPOINT_KEY: self.core.own_gossip_state()}
        for key, obj in state.items():
            if isinstance(obj, nn.Module):
                keep = filter.get(key, lambda name, value: True)
                mine[key] = {k: v.detach().cpu().clone() for k, v in obj.state_dict().items() if keep(k, v)}
            elif isinstance(obj, Optimizer):
                mine[key] = self.get_optimizer_state(obj)
        path = os.fspath(path)

        def write_main(entry: dict[str, Any]) -> None:
            # The model's entry: the consensus, in place while Fabric turns the model into its state dict.
            self.checkpoint_io.save_checkpoint(
                {**self._convert_stateful_objects_in_state(state, filter), CHECKPOINT_KEY: entry}, path,
                storage_options=storage_options,
            )

        with self.core.consensus_swapped_in():
            self.core.save(
                path,
                mine,
                write_part=lambda own, part: self.checkpoint_io.save_checkpoint(dict(own), part),
                write_main=write_main,
                remove_old_parts=remove_old_parts if _is_local(path) else None,
                remove_leftovers=remove_leftovers
                if self.checkpoint_io.writes_local_files_at_once(path, storage_options) else None,
            )

    @override
    def load_checkpoint(
        self,
        path: Any,
        state: Optional[Union[nn.Module, Optimizer, dict[str, Union[nn.Module, Optimizer, Any]]]] = None,
        strict: bool = True,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        """Resume every rank's own model, optimizer state and gossip state; onto another number of processes, the
        consensus model.

        Same number of processes M: rank i gets back its own weights, optimizer state, gossip weight, schedule
        position, counters and messages in flight, so training goes on exactly as if it had not stopped. A different
        number M': every rank starts from the checkpoint's consensus model with the old rank 0's optimizer state,
        gossip weight 1/M', and the schedule going on from the saved step (a warning says so). Without a set-up
        model (or ``state`` not a dict) this is Fabric's plain loading: the model entry is the consensus.
        """
        # Lightning < 2.5 has no `weights_only` here (nor in TorchCheckpointIO): pass it only when it is given
        extra = {} if weights_only is None else {"weights_only": weights_only}
        if not isinstance(state, dict) or not state or self.averager is None:
            return super().load_checkpoint(path, state=state, strict=strict, **extra)
        from lightning_gossip.checkpoint_io import check_checkpoint_fits

        checkpoint = self.checkpoint_io.load_checkpoint(path, **extra)
        entry = checkpoint.pop(CHECKPOINT_KEY, None)
        plan = None
        if entry is not None:
            own = None
            if resumes_rank_by_rank(entry, self.world_size):
                if "parts" in entry:
                    # checked against its header on every rank before any resumes; a bad part names its file
                    own = self.core.load_own_part(self.checkpoint_io, os.fspath(path), entry, **extra)
                else:  # written before per-rank parts: every rank's state in the file
                    own = entry["ranks"][self.global_rank]
                checkpoint.update({key: value for key, value in own.items() if key != CHECKPOINT_KEY})
            plan = self.core.plan_resume(entry, own, self.world_size)
        missing = [key for key in state if key not in checkpoint]
        if strict and missing:
            raise KeyError(
                f"The requested state contains keys {missing} that are not in the checkpoint {path!s} "
                f"(it has {sorted(checkpoint)}); pass strict=False to skip them."
            )
        for key, obj in list(state.items()):
            if key not in checkpoint:
                continue
            if isinstance(obj, nn.Module):
                check_checkpoint_fits(obj, checkpoint[key], strict)
                self.load_module_state_dict(obj, checkpoint.pop(key), strict=strict)
            elif hasattr(obj, "load_state_dict") and hasattr(obj, "state_dict"):
                obj.load_state_dict(checkpoint.pop(key))
            else:
                state[key] = checkpoint.pop(key)
        if plan is not None:
            self.core.resume(plan)
        return checkpoint

    @override
    def teardown(self) -> None:
        self.core.leave_consensus(failed=True)
        if self.averager is not None:
            self.averager.exchange.close()
        super().teardown()

    @classmethod
    @override
    def register_strategies(cls, strategy_registry: Any) -> None:
        entries = [("gossip", "popen", {}), ("gossip_spawn", "spawn", {}), ("gossip_fork", "fork", {}),
                   ("gossip_async", "popen", {"asynchronous": True})]
        for name, start_method, extra in entries:
            strategy_registry.register(
                name,
                cls,
                description=f"GoSGD gossip strategy for Fabric with `start_method` '{start_method}'"
                + (" (asynchronous)" if extra else ""),
                start_method=start_method,
                **extra,
            )
        for name, (description, settings) in OUTER_STRATEGIES.items():  # "gossip_outer", "gossip_outer_async"
            strategy_registry.register(name, cls, description=description, **settings)


def refuse_killing_launcher(environment: Optional[ClusterEnvironment]) -> None:
    """``on_peer_loss="continue"`` needs the survivors left running: refuse, before any worker starts, the launchers
    that end every worker when one dies (Fabric's own, torchrun's agent)."""
    from lightning.fabric.plugins.environments import TorchElasticEnvironment

    how = ("start the workers with `python -m lightning_gossip.gossip.launch --nproc N your_script.py` (it leaves the "
           "survivors running and hosts the store outside the workers), with Fabric(devices=N)")
    if isinstance(environment, TorchElasticEnvironment):
        raise ValueError("GossipFabricStrategy(on_peer_loss='continue') cannot run under torchrun: its agent ends "
                         f"every worker when one dies (and restarts them all). Instead {how}.")
    if environment is None or not environment.creates_processes_externally:
        raise ValueError("GossipFabricStrategy(on_peer_loss='continue') needs workers whose death leaves the others "
                         "running, but Fabric would start them itself, and its launcher ends every process when one "
                         f"dies (rank 0 also hosts the store there). Instead {how}.")


def _default_group(group: Any) -> bool:
    # Fabric's all_reduce/all_gather pass the default group explicitly when the caller named none.
    return group is None or group is dist.group.WORLD


def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _broadcast_object(obj: Any, src: Optional[int], group: Any, what: str) -> Any:
    """``obj`` of global rank ``src`` (``None``: the group's lowest member) over ``group``."""
    from lightning_gossip.gossip.errors import GossipPeerError

    members = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    if src is None:
        src = min(members)
    if src not in members:
        raise GossipPeerError(f"Rank {dist.get_rank()} cannot run {what}: rank {src} was lost (the survivors are "
                              f"ranks {members}).", dist.get_rank(), [src])
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def _shares_work(dataloader: Any) -> bool:
    from lightning_gossip.gossip.work_sharing import WorkSharingSampler

    sampler = getattr(dataloader, "sampler", None)
    return isinstance(getattr(sampler, "dataset", None), WorkSharingSampler)


def _is_local(path: str) -> bool:
    from lightning_gossip._lightning_compat import _is_local_file_protocol

    return _is_local_file_protocol(path)


# Importing this module registers the names (see lightning_gossip/_registration.py); a reload must not fail.
if "gossip" not in STRATEGY_REGISTRY:
    GossipFabricStrategy.register_strategies(STRATEGY_REGISTRY)
