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
import signal
import sys
import uuid
from contextlib import ExitStack, suppress
from datetime import timedelta
from typing import Any, Callable, Literal, Mapping, Optional, Union

import torch
import torch.distributed as dist
from lightning.fabric.plugins import CheckpointIO, ClusterEnvironment, TorchCheckpointIO
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.strategies import _StrategyRegistry
from lightning.fabric.strategies.launchers.subprocess_script import _ChildProcessObserver
from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
from lightning.fabric.utilities.distributed import _set_num_threads_if_needed
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.overrides.distributed import _sync_module_states
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher, _SubprocessScriptLauncher
from lightning.pytorch.trainer.connectors.signal_connector import _get_sigkill_signal
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim import Optimizer
from typing_extensions import override

import lightning.pytorch as pl
from lightning_gossip.gossip import GossipAverager, GossipCounters, GossipScheduleError
from lightning_gossip.gossip.averager import check_gossip_options, resolve_staleness
from lightning_gossip.gossip.errors import collective_guard
from lightning_gossip.gossip.state import NO_FLOAT_TENSORS, gossiped_tensors
from lightning_gossip.gossip.topology import TopologyLike, resolve_topology, validate_topology

log = logging.getLogger(__name__)

EVAL_MODES = ("consensus", "local")
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
        # Everything that can be checked without a model or a process group is checked here, before any spawn.
        check_gossip_options(p, topology, average_every, transfer_dtype, on_nonfinite, overlap, staleness)
        if eval_mode not in EVAL_MODES:
            raise ValueError(f"eval_mode must be one of {EVAL_MODES}, got {eval_mode!r}.")
        if sigterm_sync_every is not None and (
            isinstance(sigterm_sync_every, bool) or not isinstance(sigterm_sync_every, int) or sigterm_sync_every < 1
        ):
            raise ValueError(
                f"sigterm_sync_every must be None or an integer >= 1 (steps), got {sigterm_sync_every!r}."
            )
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise TypeError(f"seed must be None or an int, got {seed!r}.")
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
        self.p = float(p)
        self.topology = resolve_topology(topology)
        self.seed = seed
        self.mix_buffers = mix_buffers
        self.staleness = resolve_staleness(overlap, staleness)
        self.average_every = average_every
        self.transfer_dtype = transfer_dtype
        self.eval_mode = eval_mode
        self.final_consensus = final_consensus
        self.on_nonfinite = on_nonfinite
        self.monitor = monitor
        self.sigterm_sync_every = sigterm_sync_every
        self.averager: Optional[GossipAverager] = None
        self._resume_state: Optional[dict[str, Any]] = None
        self._resume_step: Optional[int] = None  # resuming onto a different number of workers: the schedule position
        self._eval_stack: Optional[ExitStack] = None

    # -- read-outs ------------------------------------------------------------------------------------------------
    @property
    def overlap(self) -> bool:
        """Whether exchanges are mixed in later than they are posted (``staleness >= 1``)."""
        return self.staleness > 0

    @property
    def is_distributed(self) -> bool:
        # Lightning adds distributed samplers and honours `sync_dist` only for strategies that say this.
        return True

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
        validate_topology(self.topology, self.num_nodes * self.num_processes)
        assert self.cluster_environment is not None
        if self._start_method == "popen":
            self._launcher = _GossipSubprocessScriptLauncher(
                self, self.cluster_environment, self.num_processes, self.num_nodes
            )
        else:
            self._launcher = _GossipMultiProcessingLauncher(self, start_method=self._start_method)

    def _check_before_launch(self, trainer: Optional["pl.Trainer"]) -> None:
        """Checks that need the model but no process group, run before any worker process is started."""
        module = trainer.lightning_module if trainer is not None else None
        if module is None or trainer.state.fn != TrainerFn.FITTING or is_overridden("configure_model", module):
            return  # a model built in `configure_model` only gets its tensors after the launch
        if not gossiped_tensors(module, self.mix_buffers):
            raise ValueError(f"{NO_FLOAT_TENSORS} (model: {type(module).__name__}).")

    @override
    def on_exception(self, exception: BaseException) -> None:
        """A failed rank 0 stops the worker processes it launched, so none is left waiting for it.

        Lightning already does the reverse (its process observer kills everything when a worker exits with an
        error); without this, the workers of a failed launcher would wait for it until the process-group timeout.
        """
        super().on_exception(exception)
        launcher = self._launcher
        if isinstance(launcher, _SubprocessScriptLauncher) and launcher.procs:
            launcher.kill(_get_sigkill_signal())
            for proc in launcher.procs:
                with suppress(Exception):
                    proc.wait(timeout=10)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        if self.world_size == 1:
            rank_zero_warn(
                "GossipStrategy runs with a single process (world size 1): nothing is gossiped and training is "
                "plain single-process training. Use devices>1 or num_nodes>1 to gossip."
            )

    @override
    def setup(self, trainer: "pl.Trainer") -> None:
        assert self.accelerator is not None and self.model is not None
        self.accelerator.setup(trainer)
        fitting = trainer.state.fn == TrainerFn.FITTING
        if fitting and self._layer_sync:
            self.model = self._layer_sync.apply(self.model)
        self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        if fitting:
            # No DistributedDataParallel wrapper: that is where DDP's gradient all-reduce lives.
            self._setup_averager()
            self._throttle_sigterm_broadcast(trainer)
            self.setup_optimizers(trainer)
        elif self.averager is not None:
            # Evaluating after this process already trained: each rank keeps the model gossip left it with, and
            # eval_mode decides what is evaluated.
            self.averager.refresh_tensors()
        else:
            # Nothing was trained here: make sure every rank evaluates the same model.
            _sync_module_states(self.model)
        self.setup_precision_plugin()
        if fitting:
            _optimizers_to_device(self.optimizers, self.root_device)
        if self.monitor:
            from lightning_gossip.callbacks import GossipMonitor

            if not any(isinstance(cb, GossipMonitor) for cb in trainer.callbacks):
                trainer.callbacks.append(GossipMonitor())

    def _setup_averager(self) -> None:
        assert self.lightning_module is not None
        seed = self.seed if self.seed is not None else int(os.environ.get("PL_GLOBAL_SEED", 0))
        resume, self._resume_state = self._resume_state, None
        self.averager = GossipAverager(
            self.lightning_module,
            p=self.p,
            topology=self.topology,
            seed=seed,
            mix_buffers=self.mix_buffers,
            staleness=self.staleness,
            average_every=self.average_every,
            transfer_dtype=self.transfer_dtype,
            on_nonfinite=self.on_nonfinite,
            # Resuming: every rank loaded its own weights from the checkpoint; broadcasting would erase them.
            broadcast=resume is None,
        )
        if resume is not None:
            self.averager.load_state_dict(resume)
        elif self._resume_step is not None:
            self.averager.step_count = self._resume_step
        self._resume_step = None

    def _throttle_sigterm_broadcast(self, trainer: "pl.Trainer") -> None:
        """Run Lightning's per-step SIGTERM broadcast only every ``sigterm_sync_every`` gossip steps.

        The gossip step count is the same on every rank before each training step, so the broadcast stays a matched
        collective. Lightning versions without the per-step broadcast are left alone.
        """
        loop = trainer.fit_loop.epoch_loop
        original = getattr(type(loop), "_broadcast_sigterm_tensor", None)
        if original is None:
            return
        every = self.sigterm_sync_every

        def throttled() -> None:
            if every is not None and self.gossip_step % every == 0:
                throttled.broadcasts += 1  # type: ignore[attr-defined]
                original(loop)

        throttled.broadcasts = 0  # type: ignore[attr-defined]
        loop._broadcast_sigterm_tensor = throttled

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
        if self.averager is None or self.world_size == 1:
            return
        self._check_same_step_count()
        if self.final_consensus:
            self.averager.consensus_()
        else:
            self.averager.finish()
        # Nothing is in flight any more; give back the pooled message buffers (K x model size with staleness K).
        self.averager.exchange.release_free_buffers()

    def _check_same_step_count(self) -> None:
        assert self.averager is not None
        steps = torch.tensor([self.averager.step_count], dtype=torch.int64, device=self.root_device)
        everyone = [torch.zeros_like(steps) for _ in range(self.world_size)]
        with collective_guard("the check that every rank took the same number of steps"):
            dist.all_gather(everyone, steps)
        counts = [int(t.item()) for t in everyone]
        if len(set(counts)) > 1:
            raise GossipScheduleError(
                f"Ranks took different numbers of optimizer steps: {counts}. Gossip pairs ranks by step number, so "
                "every rank must take the same number of steps: equal-length data shards (Lightning's "
                "DistributedSampler pads them; keep `use_distributed_sampler=True` or shard evenly yourself) and no "
                "optimizer steps skipped on some ranks only."
            )

    # -- evaluation -----------------------------------------------------------------------------------------------
    def _enter_consensus(self) -> None:
        if self.eval_mode != "consensus" or self.averager is None or self.world_size == 1:
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
        if not self.is_global_zero:
            return
        plain_io = type(self.checkpoint_io) is TorchCheckpointIO and storage_options is None
        if plain_io and _is_local_file_protocol(filepath):
            _atomic_local_save(checkpoint, os.fspath(filepath))
        else:
            self.checkpoint_io.save_checkpoint(checkpoint, filepath, storage_options=storage_options)

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
            _check_checkpoint_fits(self.lightning_module, checkpoint["state_dict"], strict)
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
            _check_checkpoint_fits(self.lightning_module, checkpoint["state_dict"], strict)
            super().load_model_state_dict(checkpoint, strict=strict)
            self._resume_step = step
            return
        mine = gossip["ranks"][self.global_rank]
        _check_checkpoint_fits(self.lightning_module, mine["model"], strict)
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
    def register_strategies(cls, strategy_registry: _StrategyRegistry) -> None:
        for name, start_method in (("gossip", "popen"), ("gossip_spawn", "spawn"), ("gossip_fork", "fork")):
            strategy_registry.register(
                name,
                cls,
                description=f"GoSGD gossip strategy with `start_method` '{start_method}'",
                start_method=start_method,
            )


def _check_checkpoint_fits(module: torch.nn.Module, state_dict: Mapping[str, Any], strict: bool) -> None:
    """A clear error, naming the first mismatching key and shapes, for a checkpoint written for another model."""
    own = module.state_dict()
    mismatched = [
        f"{key} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} in the model"
        for key, value in state_dict.items()
        if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape
    ]
    missing = [key for key in own if key not in state_dict] if strict else []
    unexpected = [key for key in state_dict if key not in own] if strict else []
    if not (mismatched or missing or unexpected):
        return
    problems = mismatched[:3]
    if len(mismatched) > 3:
        problems.append(f"{len(mismatched) - 3} more shape mismatches")
    if missing:
        problems.append(f"missing from the checkpoint: {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"not in the model: {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
    raise RuntimeError(
        f"This checkpoint does not fit the model {type(module).__name__}; was it written for another model? "
        + "; ".join(problems)
        + "."
    )


def _atomic_local_save(checkpoint: dict[str, Any], path: str) -> None:
    """Write a checkpoint so that a crash at any moment leaves either the old file or the new one, never a torn one.

    Lightning's ``TorchCheckpointIO`` writes to a file in the system temporary directory and moves it into place: a
    rename only when both are on one filesystem (a copy into the target otherwise, e.g. with /tmp on tmpfs), and
    without fsync. Here: a temporary file next to the target, fsync, ``os.replace``, fsync of the directory.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise
    with suppress(OSError):  # make the rename itself durable; not possible on every platform/filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _GossipSubprocessScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's popen launcher, with the gossip checks that need the model run before any process starts, and a
    process observer that says which rank was lost."""

    def __init__(self, strategy: GossipStrategy, *args: Any) -> None:
        super().__init__(*args)
        self._strategy = strategy

    @override
    def launch(self, function: Callable, *args: Any, trainer: Optional["pl.Trainer"] = None, **kwargs: Any) -> Any:
        self._strategy._check_before_launch(trainer)
        # As Lightning's launch, with _GossipChildObserver in place of its observer.
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            _GossipChildObserver(main_pid=os.getpid(), child_processes=self.procs).start()
        _set_num_threads_if_needed(num_processes=self.num_processes)
        return function(*args, **kwargs)


class _GossipChildObserver(_ChildProcessObserver):
    """Lightning's observer (every 5 s: if a worker exited with an error, SIGKILL all, rank 0 included), but it first
    writes to stderr which rank was lost and how, since it may kill rank 0 before rank 0 reports a lost peer itself
    (Lightning only logs this at INFO level, which is often not shown)."""

    @override
    def _run(self) -> bool:
        for proc in self._child_processes:
            proc.poll()
        for rank, proc in enumerate(self._child_processes, start=1):
            code = proc.returncode
            if code:
                how = f"signal {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() else (
                    f"exit code {code}"
                )
                sys.stderr.write(
                    f"GossipStrategy: lost worker rank {rank} (pid {proc.pid}, {how}). Stopping every worker process, "
                    "rank 0 included, so that none is left waiting for it; restart from the last checkpoint "
                    "(Trainer.fit(ckpt_path=...)).\n"
                )
                sys.stderr.flush()
                break
        return super()._run()


class _GossipMultiProcessingLauncher(_MultiProcessingLauncher):
    """The spawn launcher hands rank 0's module back to the parent; make that the consensus model."""

    @override
    def launch(self, function: Callable, *args: Any, trainer: Optional["pl.Trainer"] = None, **kwargs: Any) -> Any:
        self._strategy._check_before_launch(trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)

    @override
    def _collect_rank_zero_results(self, trainer: "pl.Trainer", results: Any) -> Any:
        strategy = self._strategy
        averager = getattr(strategy, "averager", None)
        if averager is None or strategy.world_size == 1 or trainer.state.fn != TrainerFn.FITTING:
            return super()._collect_rank_zero_results(trainer, results)
        # Every rank runs this, so the collective inside is matched.
        with averager.consensus_swapped_in():
            return super()._collect_rank_zero_results(trainer, results)
