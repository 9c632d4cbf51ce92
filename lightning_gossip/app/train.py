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

So this entry point is its own ``torchrun``: when the strategy would re-run the script (popen, several devices), the
Hydra process only saves the job's fully resolved config to ``<output_dir>/.worker_config.yaml`` and starts ALL
ranks 0..M-1 as fresh ``python -m lightning_gossip.train`` processes with that file in
``LIGHTNING_GOSSIP_WORKER_CONFIG`` (no Hydra in them: no argv parsing, no output folders of their own) and
``LOCAL_RANK``/``NODE_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` (a free port per job) set, so Lightning
knows the processes exist. It waits for them, stops the others shortly after one fails, and reads the metrics back
from ``results.json``, which rank 0 writes. Single runs and multirun jobs take the same path; every job gets fresh
processes. Single-device runs, and the spawn start method (``strategy.start_method=spawn``, ``strategy=gossip_spawn``,
whose processes are fresh already), run in the Hydra process as usual.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lightning_gossip.train")

WORKER_CONFIG_ENV = "LIGHTNING_GOSSIP_WORKER_CONFIG"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")
RESULTS_FILE = "results.json"
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


# ---------------------------------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------------------------------
class WorkerProcesses:
    """Run every rank of one job as a fresh ``python -m lightning_gossip.train`` process on this node.

    Args:
        cfg: the job's composed config (resolved and saved for the workers).
        output_dir: the job's folder.
        world_size: number of processes (ranks 0..world_size-1).
        grace: after the first worker fails, seconds the others get to fail on their own (and say why) before
            they are stopped.
    """

    def __init__(self, cfg: DictConfig, output_dir: Path, world_size: int, grace: float = 10.0) -> None:
        self.cfg = cfg
        self.output_dir = Path(output_dir)
        self.world_size = int(world_size)
        self.grace = grace
        self.procs: list[subprocess.Popen] = []
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

    def _env(self, rank: int, port: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in _DIST_ENV and k != "RANK"}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", WORLD_SIZE=str(self.world_size),
                   LOCAL_RANK=str(rank), **{WORKER_CONFIG_ENV: str(self.config_path)})
        env.setdefault("OMP_NUM_THREADS", str(self.cfg.get("threads_per_worker") or 1))
        # this package importable in the workers even when it is not installed; they share our working directory
        # (relative paths resolve alike, also with hydra.job.chdir=true)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_PARENT, os.environ.get("PYTHONPATH")]))
        return env

    def run(self) -> dict[str, Any]:
        """Start the ranks, wait for them, and return ``results.json`` (written by rank 0)."""
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        self.output_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, self.config_path, resolve=True)
        results = self.output_dir / RESULTS_FILE
        if results.exists():
            results.unlink()  # a stale file must not pass for this job's result
        port = find_free_network_port()
        log.info("starting %d worker processes (ranks 0..%d, port %d) for %s", self.world_size, self.world_size - 1,
                 port, self.output_dir)
        try:
            for rank in range(self.world_size):
                cmd = [sys.executable, "-m", "lightning_gossip.train"]
                self.procs.append(subprocess.Popen(cmd, env=self._env(rank, port)))
            codes = self._wait()
        except BaseException:  # KeyboardInterrupt included: never leave workers behind
            self._terminate()
            raise
        if any(codes):
            failed = ", ".join(f"rank {r}: {_describe(c)}" for r, c in enumerate(codes) if c)
            raise RuntimeError(f"Worker processes failed ({failed}); their errors are printed above "
                               f"(config: {self.config_path}).")
        if not results.exists():
            raise RuntimeError(f"The workers finished but rank 0 wrote no {results}.")
        return json.loads(results.read_text())

    def _wait(self) -> list[int]:
        first_failure: Optional[float] = None
        while True:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes):
                return [int(c) for c in codes]
            if first_failure is None and any(c not in (None, 0) for c in codes):
                first_failure = time.monotonic()
                rank, code = next((r, c) for r, c in enumerate(codes) if c not in (None, 0))
                log.error("worker rank %d failed (%s); stopping the others in %.0f s unless they stop first",
                          rank, _describe(code), self.grace)
            if first_failure is not None and time.monotonic() - first_failure > self.grace:
                self._terminate()
                return [int(p.returncode) for p in self.procs]
            time.sleep(0.2)

    def _terminate(self, patience: float = 10.0) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + patience
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:  # e.g. Lightning's SIGTERM handler stuck in a collective
                proc.kill()
                proc.wait()


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
    info: dict[str, Any] = {}
    cb = getattr(trainer, "checkpoint_callback", None)
    if cb is not None:
        info = {"checkpoint_dir": str(cb.dirpath) if cb.dirpath else None,
                "best_checkpoint": cb.best_model_path or None, "last_checkpoint": cb.last_model_path or None}
    return info


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

    _configure_process(cfg)
    is_worker = WORKER_CONFIG_ENV in os.environ
    if not is_worker:
        if (cfg.get("extras") or {}).get("print_config"):
            print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
        world_size = WorkerProcesses.world_size_if_needed(cfg)
        if world_size:
            _check_data(cfg)  # a missing dataset path fails here, before any worker process starts
            result = WorkerProcesses(cfg, Path(cfg.paths.output_dir), world_size).run()
            hydra_info = _hydra_info()
            if hydra_info:  # the workers run without Hydra: add what only this process knows
                result.update(hydra_info)
                (Path(cfg.paths.output_dir) / RESULTS_FILE).write_text(json.dumps(result, indent=2, default=str))
            return result["metrics"]
    return _fit_and_test(cfg)


def _check_data(cfg: DictConfig) -> None:
    from hydra.utils import instantiate

    check = getattr(instantiate(cfg.data), "check", None)
    if callable(check):
        check()


def _fit_and_test(cfg: DictConfig) -> dict[str, Any]:
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    strategy = instantiate(cfg.strategy) if isinstance(cfg.strategy, DictConfig) else cfg.strategy
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=instantiate_callbacks(cfg.get("callbacks")),
                          logger=instantiate_loggers(cfg.get("logger")) or False)

    start = time.time()
    trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
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
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    run(cfg)


def main() -> None:
    if WORKER_CONFIG_ENV in os.environ:
        _worker_main(os.environ[WORKER_CONFIG_ENV])
        return
    import hydra

    from lightning_gossip.app.config_source import CONFIG_NAME, config_path

    # the configs shipped in the package (or a checkout's conf/); add your own with --config-dir
    @hydra.main(version_base="1.3", config_path=config_path(), config_name=CONFIG_NAME)
    def _hydra_main(cfg: DictConfig) -> Optional[float]:
        metrics = run(cfg)
        value = metrics.get("test/acc", metrics.get("val/acc"))
        return float(value) if value is not None else None  # for hydra sweepers (e.g. optuna)

    _hydra_main()


if __name__ == "__main__":
    main()
