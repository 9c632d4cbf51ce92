"""The Hydra entry point: ``python -m lightning_gossip.train [overrides]`` (``-m`` for a multirun sweep).

It composes ``conf/train.yaml``, seeds, instantiates the datamodule, model, strategy, callbacks, loggers and
trainer, fits, tests, writes ``results.json`` into the run's folder and prints the test accuracy and where the logs
and checkpoints went. See ``conf/train.yaml`` for examples.

Worker processes and Hydra
--------------------------
Lightning's popen launcher (used by ``ddp`` and ``gossip``) starts ranks 1..M-1 by re-running ``sys.argv``. Under
Hydra multirun that command line is the whole sweep (``-m strategy.p=0,0.1 seed=1,2``), so every child would start
a sweep of its own (Lightning appends ``hydra.run.dir=...`` but keeps ``-m`` and the sweep lists), and the jobs'
workers end up with the wrong settings or in the wrong folder. And rank 0 would live in the Hydra process, which
runs job after job: a job that dies mid-collective leaves that process's distributed state, signal handlers and
threads behind for the next job.

So this entry point runs ``torchrun`` as a library: when the strategy would re-run the script (popen, several
devices), the Hydra process only saves the job's fully resolved config to ``<output_dir>/.worker_config.yaml`` and
starts torch's elastic agent (:class:`ElasticWorkers`: ``elastic_launch``, a c10d rendezvous on 127.0.0.1 with a free
port and a fresh run id per job), which starts ALL ranks 0..M-1 as fresh ``python -m lightning_gossip.train``
processes with that file in ``LIGHTNING_GOSSIP_WORKER_CONFIG`` (no Hydra in them: no argv parsing, no output folders
of their own) and torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``TORCHELASTIC_RUN_ID``, ...), so
Lightning knows the processes exist. The agent waits for them, stops the others at once when one fails, and, with
the top-level config key ``max_restarts`` > 0, restarts the whole group, which resumes from the job's last checkpoint
(``<output_dir>/checkpoints/last.ckpt``) and finishes the configured epochs. The metrics come back through
``results.json``, which rank 0 writes. Single runs and multirun jobs take the same path; every job (and every
restart) gets fresh processes, and a signal (SIGTERM, SIGINT) to the Hydra process stops every worker (SIGTERM, then
SIGKILL after ``shutdown_timeout`` seconds) and ends it with exit code 128 + the signal's number. Workers die with
the Hydra process even when it is SIGKILLed. Single-device runs (without ``max_restarts``), and the spawn start
method (``strategy.start_method=spawn``, ``strategy=gossip_spawn``, whose processes are fresh already), run in the
Hydra process as usual.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from lightning_gossip.app.checks import check_config, register_resolvers

log = logging.getLogger("lightning_gossip.train")

WORKER_CONFIG_ENV = "LIGHTNING_GOSSIP_WORKER_CONFIG"
# the pid of the Hydra process that started a worker: a worker whose parent is gone stops (see _die_with_parent)
PARENT_PID_ENV = "LIGHTNING_GOSSIP_PARENT_PID"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")
RESULTS_FILE = "results.json"
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


# ---------------------------------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------------------------------
class ElasticWorkers:
    """Run every rank of one job as a fresh ``python -m lightning_gossip.train`` process, through torch's elastic agent.

    This is ``torchrun`` used as a library (:func:`torch.distributed.launcher.api.elastic_launch`): a c10d rendezvous
    on 127.0.0.1 with a free port and a fresh run id per job, ``nproc_per_node`` worker processes, and with
    ``max_restarts`` > 0 a worker group that is restarted when one of its processes fails. A restarted group resumes
    from the job's last checkpoint by itself (see :func:`_resume_path`). The Hydra process only starts the agent and
    waits; the agent stops every worker (SIGTERM, then SIGKILL after ``shutdown_timeout`` seconds) when one fails
    for good, when it is signalled, or when the job ends.

    Args:
        cfg: the job's composed config (resolved and saved for the workers).
        output_dir: the job's folder.
        world_size: number of processes (ranks 0..world_size-1).
        max_restarts: how many times a failed worker group is restarted (0: a failure ends the job).
        shutdown_timeout: seconds a worker gets to stop after SIGTERM before it is SIGKILLed.
    """

    def __init__(self, cfg: DictConfig, output_dir: Path, world_size: int, max_restarts: int = 0,
                 shutdown_timeout: int = 30) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.world_size = int(world_size)
        self.max_restarts = int(max_restarts)
        self.shutdown_timeout = int(shutdown_timeout)
        self.config_path = self.output_dir / ".worker_config.yaml"

    @staticmethod
    def world_size_if_needed(cfg: DictConfig) -> Optional[int]:
        """The number of processes when the configured strategy would re-run the script (popen); else None.

        Decided by instantiating the strategy and a bare Trainer (no loggers, callbacks or processes).
        """
        from hydra.utils import instantiate
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        if not isinstance(cfg.strategy, DictConfig):
            return None
        lightning_log = logging.getLogger("lightning.pytorch")
        level = lightning_log.level
        lightning_log.setLevel(logging.WARNING)  # the workers print the device summary
        try:
            trainer = instantiate(cfg.trainer, strategy=instantiate(cfg.strategy), logger=False, callbacks=[],
                                  enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        finally:
            lightning_log.setLevel(level)
        strategy = trainer.strategy
        launcher = getattr(strategy, "launcher", None)
        if not isinstance(launcher, _SubprocessScriptLauncher):
            return None
        if strategy.cluster_environment.creates_processes_externally:
            return None  # torchrun, SLURM, or a worker of ours: the processes exist already
        if launcher.num_nodes > 1:
            raise RuntimeError("num_nodes > 1: start the processes with torchrun or SLURM; this entry point starts "
                               "the workers of one node only.")
        return launcher.num_processes if launcher.num_processes > 1 else None

    def _launch_config(self) -> Any:
        from lightning.fabric.plugins.environments.lightning import find_free_network_port
        from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
        from torch.distributed.launcher.api import LaunchConfig

        port = find_free_network_port()
        run_id = f"lightning-gossip-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        return LaunchConfig(
            min_nodes=1, max_nodes=1, nproc_per_node=self.world_size, run_id=run_id,
            rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{port}", local_addr="127.0.0.1",
            rdzv_configs={"timeout": 600}, max_restarts=self.max_restarts, monitor_interval=0.5,
            # the agent's own files (error reports) stay in the job's folder, not in /tmp
            logs_specs=DefaultLogsSpecs(log_dir=str(self.output_dir / ".elastic")),
            shutdown_timeout=self.shutdown_timeout,
        )

    def _worker_env(self) -> dict[str, str]:
        env = {WORKER_CONFIG_ENV: str(self.config_path), PARENT_PID_ENV: str(os.getpid())}
        # Each attempt of the worker group bootstraps its process group on a store of its own. By default the
        # workers share the agent's rendezvous store, which outlives a restart: the restarted ranks then read the
        # previous attempt's addresses (gloo: "Connection refused") and the restart fails.
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
        env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS") or str(self.cfg.get("threads_per_worker") or 1)
        # this package importable in the workers even when it is not installed; they share our working directory
        # (relative paths resolve alike, also with hydra.job.chdir=true)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
        return env

    def run(self) -> dict[str, Any]:
        """Start the ranks, wait for them (and their restarts), and return ``results.json`` (written by rank 0)."""
        from torch.distributed.elastic.multiprocessing.api import SignalException
        from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
        from torch.distributed.launcher.api import elastic_launch

        self.output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.config_path, resolve=True)
        results = self.output_dir / RESULTS_FILE
        if results.exists():
            results.unlink()  # a stale file must not pass for this job's result
        config = self._launch_config()
        log.info("starting %d worker processes (ranks 0..%d, rendezvous %s, max_restarts %d) for %s",
                 self.world_size, self.world_size - 1, config.rdzv_endpoint, self.max_restarts, self.output_dir)
        # The agent's worker processes inherit this process's environment; it installs signal handlers of its own
        # (SIGTERM/SIGINT/SIGHUP/SIGQUIT raise SignalException). Both are put back afterwards: the next job of a
        # multirun starts from a clean process.
        handlers = {s: signal.getsignal(s) for s in _HANDLED_SIGNALS}
        saved_env = dict(os.environ)
        try:
            for key in (*_DIST_ENV, "RANK"):
                os.environ.pop(key, None)
            os.environ.update(self._worker_env())
            elastic_launch(config, sys.executable)("-m", "lightning_gossip.train")
        except ChildFailedError as err:
            raise RuntimeError(f"Worker processes failed{_restarts(self.max_restarts)} ({_failures(err.failures)}); "
                               f"their errors are printed above (config: {self.config_path}).") from None
        except SignalException as err:
            # The agent has stopped every worker already (SIGTERM, then SIGKILL after shutdown_timeout).
            log.error("received %s: stopped the worker processes of %s", err.sigval.name, self.output_dir)
            # SystemExit, not an Exception: Hydra must not go on with the next job of a multirun.
            raise SystemExit(128 + int(err.sigval)) from None
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            for signum, handler in handlers.items():
                if handler is not None:
                    signal.signal(signum, handler)
        if not results.exists():
            raise RuntimeError(f"The workers finished but rank 0 wrote no {results}.")
        return json.loads(results.read_text())


_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def _restarts(max_restarts: int) -> str:
    return f" after {max_restarts} restart(s)" if max_restarts else ""


def _failures(failures: dict[int, Any]) -> str:
    """The ranks that failed first; those the agent then stopped itself (SIGTERM) are listed apart.

    A rank killed by a signal the agent did not send (the OOM killer, a preempted node) is listed before ranks that
    exited with an error: those usually raised because they lost that peer, and may do so before the agent's next
    poll sees the killed one, so one poll can hold both.
    """
    stopped = {rank for rank, f in failures.items() if f.exitcode == -int(signal.SIGTERM)}
    causes = sorted(set(failures) - stopped, key=lambda rank: (failures[rank].exitcode >= 0, rank)) or sorted(stopped)
    text = ", ".join(f"rank {rank}: {_describe(failures[rank].exitcode)}" for rank in causes)
    if stopped and causes != sorted(stopped):
        text += "; stopped after it: " + ", ".join(f"rank {rank}" for rank in sorted(stopped))
    return text


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


# ---------------------------------------------------------------------------------------------------------------------
# instantiation helpers
# ---------------------------------------------------------------------------------------------------------------------
def instantiate_callbacks(cfg: Optional[DictConfig]) -> list[Any]:
    from hydra.utils import instantiate

    return [instantiate(c) for c in (cfg or {}).values() if c is not None and "_target_" in c]


def instantiate_loggers(cfg: Optional[DictConfig]) -> list[Any]:
    from hydra.utils import instantiate

    loggers = []
    for name, c in (cfg or {}).items():
        if c is None or "_target_" not in c:
            continue
        try:
            loggers.append(instantiate(c))
        except Exception as err:  # TensorBoardLogger without tensorboard/tensorboardX installed
            if "ModuleNotFoundError" in type(err).__name__ or isinstance(err.__cause__, ModuleNotFoundError) \
                    or isinstance(err, ImportError):
                warnings.warn(f"logger {name!r} skipped: {err}", stacklevel=1)
            else:
                raise
    return loggers


def _scalar(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _hydra_info() -> dict[str, Any]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    return {
        "overrides": list(hc.overrides.task),
        "choices": {k: v for k, v in hc.runtime.choices.items() if not k.startswith("hydra/") and v is not None},
        "job_num": hc.job.get("num", None),
        "mode": str(hc.mode),
    }


def _strategy_stats(strategy: Any) -> dict[str, Any]:
    from lightning_gossip.strategy import GossipStrategy

    stats: dict[str, Any] = {"strategy": type(strategy).__name__, "gossip": isinstance(strategy, GossipStrategy)}
    # With the spawn launcher this process did not train (the averager lived in the spawned ranks): no counters.
    if stats["gossip"] and getattr(strategy, "averager", None) is not None:
        stats["gossip_counters"] = strategy.counters.as_dict()
        stats["gossip_weight"] = float(strategy.gossip_weight)
    return stats


def _checkpoint_info(trainer: Any) -> dict[str, Any]:
    from lightning.pytorch.callbacks import ModelCheckpoint

    callbacks = [cb for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    if not callbacks:
        return {}
    best = next((cb for cb in callbacks if cb.monitor), callbacks[0])
    # last.ckpt: Lightning's save_last, or a callback of its own that writes "last" every epoch (the app's config)
    last = next((cb.last_model_path for cb in callbacks if cb.last_model_path), None) or next(
        (cb.best_model_path for cb in callbacks if not cb.monitor and Path(cb.best_model_path).stem == "last"), None)
    return {"checkpoint_dir": str(best.dirpath) if best.dirpath else None,
            "best_checkpoint": best.best_model_path or None, "last_checkpoint": last or None}


def _log_dirs(trainer: Any) -> dict[str, str]:
    return {type(lg).__name__: str(lg.log_dir) for lg in trainer.loggers if getattr(lg, "log_dir", None)}


# ---------------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------------
def _configure_process(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.get("threads_per_worker") or 1))
    if (cfg.get("extras") or {}).get("ignore_warnings"):
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Consider setting `persistent_workers=True`.*")
        warnings.filterwarnings("ignore", ".*The number of training batches.*smaller than the logging interval.*")
        # lightning_gossip.app.models logs values that torchmetrics already synced over ranks
        warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) one composed config; returns the final metrics.

    In the Hydra process: starts the worker processes and waits for them when the strategy needs several (see the
    module docstring), else trains here. In a worker process: trains this rank.
    """
    import lightning_gossip  # noqa: F401  (registers the gossip strategies)

    is_worker = WORKER_CONFIG_ENV in os.environ
    if not is_worker:
        check_config(cfg)  # wrong types and values, a missing or unreadable ckpt_path: before any process starts
    _configure_process(cfg)
    if not is_worker:
        if (cfg.get("extras") or {}).get("print_config"):
            print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
        max_restarts = int(cfg.get("max_restarts") or 0)
        world_size = ElasticWorkers.world_size_if_needed(cfg)
        if max_restarts and not world_size:
            world_size = _restartable_single_process(cfg)
        if world_size:
            _check_data(cfg)  # a missing dataset path fails here, before any worker process starts
            output_dir = Path(cfg.paths.output_dir)
            _remove_stale_temporary_files(cfg)
            result = ElasticWorkers(cfg, output_dir, world_size, max_restarts=max_restarts,
                                    shutdown_timeout=int(cfg.get("shutdown_timeout") or 30)).run()
            hydra_info = _hydra_info()
            if hydra_info:  # the workers run without Hydra: add what only this process knows
                result.update(hydra_info)
                (output_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2, default=str))
            return result["metrics"]
    return _fit_and_test(cfg)


def _restartable_single_process(cfg: DictConfig) -> int:
    """max_restarts with a single-process strategy: 1 worker process under the agent (spawn: refused)."""
    strategy = cfg.get("strategy")
    if isinstance(strategy, DictConfig) and strategy.get("start_method") not in (None, "popen"):
        raise ValueError(f"max_restarts={cfg.max_restarts} needs worker processes started by this entry point "
                         f"(strategy.start_method=popen), got strategy.start_method={strategy.start_method!r}.")
    return 1


def _checkpoint_dirs(cfg: DictConfig) -> list[Path]:
    """The folders the configured ModelCheckpoint callbacks write to."""
    dirs = []
    for callback in (cfg.get("callbacks") or {}).values():
        if isinstance(callback, DictConfig) and "ModelCheckpoint" in str(callback.get("_target_", "")) \
                and callback.get("dirpath"):
            dirs.append(Path(str(callback.dirpath)))
    return list(dict.fromkeys(dirs))


def _remove_stale_temporary_files(cfg: DictConfig) -> None:
    """Before the workers start nobody writes checkpoints: a temporary file left there is a dead writer's."""
    for folder in _checkpoint_dirs(cfg):
        for stale in folder.glob(".*.tmp") if folder.is_dir() else ():
            log.warning("removing %s, left by a checkpoint save that did not finish", stale)
            stale.unlink(missing_ok=True)


def _resume_path(cfg: DictConfig) -> Optional[str]:
    """The checkpoint this worker starts from.

    A worker group restarted by the elastic agent (``TORCHELASTIC_RESTART_COUNT`` > 0) resumes from the newest
    ``last*.ckpt`` in the job's checkpoint folders (Lightning's ``ckpt_path="last"``); when the job wrote none yet,
    from the configured ``ckpt_path``, like the first attempt.
    """
    configured = cfg.get("ckpt_path")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0:
        found = [p for d in _checkpoint_dirs(cfg) if d.is_dir() for p in d.glob("last*.ckpt")]
        if found:
            log.warning("restart %s of the worker group: resuming from the job's last checkpoint (%s)",
                        os.environ["TORCHELASTIC_RESTART_COUNT"], max(found, key=lambda p: p.stat().st_mtime))
            return "last"
    return None if configured is None else str(configured)


def _check_data(cfg: DictConfig) -> None:
    from hydra.utils import instantiate

    check = getattr(instantiate(cfg.data), "check", None)
    if callable(check):
        check()


def _fit_and_test(cfg: DictConfig) -> dict[str, Any]:
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    strategy = instantiate(cfg.strategy) if isinstance(cfg.strategy, DictConfig) else cfg.strategy
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=instantiate_callbacks(cfg.get("callbacks")),
                          logger=instantiate_loggers(cfg.get("logger")) or False)

    start = time.time()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=_resume_path(cfg))
    except SIGTERMException as err:
        # Lightning ends a fit stopped by SIGTERM with SystemExit() (exit code 0): the job did not finish, and an
        # elastic agent or a scheduler must not count it as a success.
        raise SystemExit(128 + int(signal.SIGTERM)) from err
    metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        results = trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update({k: _scalar(v) for k, v in (results[0] if results else {}).items()})
    runtime = time.time() - start
    if trainer.global_rank != 0:
        return metrics
    result = {
        "metrics": metrics,
        "runtime_s": round(runtime, 2),
        "world_size": int(trainer.world_size) if trainer.world_size else 1,
        "num_devices": int(trainer.num_devices),
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "seed": cfg.seed,
        "output_dir": str(output_dir),
        "log_dirs": _log_dirs(trainer),
        **_checkpoint_info(trainer),
        **_strategy_stats(trainer.strategy),
        **_hydra_info(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2, default=str))
    _print_summary(result)
    return metrics


def _print_summary(result: dict[str, Any]) -> None:
    metrics = result["metrics"]
    which = "consensus model" if result.get("gossip") else "model"
    lines = ["", "=" * 80]
    if "test/acc" in metrics:
        lines.append(f"Test accuracy of the {which} ({result['strategy']}, {result['num_devices']} worker(s)): "
                     f"{metrics['test/acc']:.4f}   (test/loss {metrics.get('test/loss', float('nan')):.4f})")
    if "val/acc" in metrics:
        best = metrics.get("val/acc_best", float("nan"))
        lines.append(f"Final val/acc {metrics['val/acc']:.4f}; best val/acc {best:.4f}")
    lines.append(f"Epochs {result['epochs']}, steps {result['global_step']} per worker, {result['runtime_s']:.1f} s")
    if "gossip_counters" in result:
        c = result["gossip_counters"]
        lines.append(f"Gossip (rank 0): {c.get('messages_sent')} messages, {c.get('bytes_sent')} bytes sent")
    lines.append(f"Output folder: {result['output_dir']}")
    for name, d in result["log_dirs"].items():
        lines.append(f"  {name}: {d}")
    if result.get("checkpoint_dir"):
        lines.append(f"  checkpoints: {result['checkpoint_dir']} (best: {result.get('best_checkpoint')}, "
                     f"last: {result.get('last_checkpoint')})")
    lines.append(f"  results: {Path(result['output_dir']) / RESULTS_FILE}")
    lines.append("=" * 80)
    print("\n".join(lines), flush=True)


def _worker_main(path: str) -> None:
    """A worker process (any rank): run the job's resolved config without Hydra (no argv parsing, no folders)."""
    _die_with_parent()
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{path} does not hold a job config (a mapping), got {type(cfg).__name__}.")
    run(cfg)


def _die_with_parent() -> None:
    """Linux: this worker gets SIGKILL when the process that started it dies, even by SIGKILL (no orphans)."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    # The parent may have died before the prctl: then nobody would send the signal.
    if os.getppid() != int(parent):
        os._exit(128 + int(signal.SIGKILL))


def main() -> None:
    if WORKER_CONFIG_ENV in os.environ:
        _worker_main(os.environ[WORKER_CONFIG_ENV])
        return
    import hydra

    from lightning_gossip.app.config_source import CONFIG_NAME, config_path

    register_resolvers()

    # the configs shipped in the package (or a checkout's conf/); add your own with --config-dir
    @hydra.main(version_base="1.3", config_path=config_path(), config_name=CONFIG_NAME)
    def _hydra_main(cfg: DictConfig) -> Optional[float]:
        metrics = run(cfg)
        value = metrics.get("test/acc", metrics.get("val/acc"))
        return float(value) if value is not None else None  # for hydra sweepers (e.g. optuna)

    _hydra_main()


if __name__ == "__main__":
    main()
