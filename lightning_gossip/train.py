"""The Hydra entry point: ``python -m lightning_gossip.train [overrides]`` (``-m`` for a multirun sweep).

It composes ``conf/train.yaml``, seeds, instantiates the datamodule, model, strategy, callbacks, loggers and
trainer, fits, tests, writes ``results.json`` into the run's folder and prints the test accuracy and where the logs
and checkpoints went. See ``conf/train.yaml`` for examples.

Worker processes and Hydra
--------------------------
Lightning's popen launcher (used by ``ddp`` and ``gossip``) starts ranks 1..M-1 by re-running ``sys.argv``. Under
Hydra multirun that command line is the whole sweep (``-m strategy.p=0,0.1 seed=1,2``), so every child would start
a sweep of its own (Lightning appends ``hydra.run.dir=...`` but keeps ``-m`` and the sweep lists), and the jobs'
workers end up with the wrong settings or in the wrong folder. This module therefore launches the workers itself,
as Lightning's launcher would and as ``torchrun`` does: rank 0 saves the job's fully resolved config to
``<output_dir>/.worker_config.yaml``, starts ranks 1..M-1 as ``python -m lightning_gossip.train`` with that file
in ``LIGHTNING_GOSSIP_WORKER_CONFIG`` (no Hydra in the workers: no argv parsing, no new output folders), and sets
``LOCAL_RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` so Lightning knows the processes exist. Single runs and
multirun jobs take the same path, with a fresh port per job and the process group torn down after each job. The
spawn start method (``strategy.start_method=spawn`` or ``strategy=gossip_spawn``) needs none of this and works too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("lightning_gossip.train")

WORKER_CONFIG_ENV = "LIGHTNING_GOSSIP_WORKER_CONFIG"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
RESULTS_FILE = "results.json"


# ---------------------------------------------------------------------------------------------------------------------
# worker processes
# ---------------------------------------------------------------------------------------------------------------------
class WorkerProcesses:
    """Start ranks 1..M-1 of a popen-launched strategy from a resolved config file; tear everything down after.

    A context manager around ``fit``/``test`` on rank 0. If a worker dies, the others are stopped so that rank 0's
    collectives fail fast instead of waiting for the process-group timeout.
    """

    def __init__(self, trainer: Any, cfg: DictConfig, output_dir: Path, join_timeout: float = 300.0) -> None:
        self.trainer = trainer
        self.cfg = cfg
        self.output_dir = output_dir
        self.join_timeout = join_timeout
        self.procs: list[subprocess.Popen] = []
        self.failed: Optional[str] = None
        self._saved_env: dict[str, Optional[str]] = {}
        self._stop = threading.Event()

    @staticmethod
    def needed(trainer: Any) -> bool:
        """True when Lightning would start the other ranks by re-running this script (popen, several devices)."""
        from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher

        strategy = trainer.strategy
        launcher = getattr(strategy, "launcher", None)
        if not isinstance(launcher, _SubprocessScriptLauncher):
            return False
        if strategy.cluster_environment.creates_processes_externally:
            return False  # torchrun, SLURM, or we are a worker ourselves
        if launcher.num_nodes > 1:
            raise RuntimeError("num_nodes > 1: start the processes with torchrun or SLURM; this entry point "
                               "starts the workers of one node only.")
        return launcher.num_processes > 1

    def __enter__(self) -> "WorkerProcesses":
        env = self.trainer.strategy.cluster_environment
        world_size = self.trainer.strategy.launcher.num_processes
        path = self.output_dir / ".worker_config.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.cfg, path, resolve=True)
        self._saved_env = {k: os.environ.get(k) for k in _DIST_ENV}
        # env.main_port is what rank 0 will use; read it from the environment object so both sides agree
        os.environ.update(MASTER_ADDR=str(env.main_address), MASTER_PORT=str(env.main_port), NODE_RANK="0",
                          LOCAL_RANK="0", WORLD_SIZE=str(world_size))
        for rank in range(1, world_size):
            child_env = dict(os.environ, LOCAL_RANK=str(rank), **{WORKER_CONFIG_ENV: str(path)})
            child_env.setdefault("OMP_NUM_THREADS", str(self.cfg.get("threads_per_worker", 1)))
            self.procs.append(subprocess.Popen([sys.executable, "-m", "lightning_gossip.train"], env=child_env))
        threading.Thread(target=self._watch, name="gossip-worker-watch", daemon=True).start()
        log.info("started %d worker processes (ranks 1..%d) for %s", world_size - 1, world_size - 1, path.parent)
        return self

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            for rank, proc in enumerate(self.procs, start=1):
                code = proc.poll()
                if code not in (None, 0):
                    self.failed = f"worker rank {rank} exited with code {code}"
                    log.error("%s; stopping the other workers", self.failed)
                    self._terminate()
                    return

    def _terminate(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                deadline = time.monotonic() + self.join_timeout
                for proc in self.procs:
                    try:
                        proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        self.failed = self.failed or f"worker pid {proc.pid} did not exit within {self.join_timeout}s"
            self._stop.set()
            self._terminate()
            codes = [p.returncode for p in self.procs]
            if exc_type is None and any(c != 0 for c in codes):
                self.failed = self.failed or f"worker exit codes {codes}"
        finally:
            self._stop.set()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()  # the next multirun job needs a fresh group
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
        if self.failed and exc_type is None:
            raise RuntimeError(f"Training finished on rank 0 but {self.failed}.")
        if self.failed and exc_type is not None:
            log.error("rank 0 failed after %s", self.failed)


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
def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) one composed config on this process's rank; returns the final metrics (on every rank)."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate

    import lightning_gossip  # noqa: F401  (registers the gossip strategies)

    torch.set_num_threads(int(cfg.get("threads_per_worker") or 1))
    extras = cfg.get("extras") or {}
    if extras.get("ignore_warnings"):
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Consider setting `persistent_workers=True`.*")
        warnings.filterwarnings("ignore", ".*The number of training batches.*smaller than the logging interval.*")
        # lightning_gossip.models logs values that torchmetrics already synced over ranks
        warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")
    is_worker = WORKER_CONFIG_ENV in os.environ
    if extras.get("print_config") and not is_worker:
        print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)

    output_dir = Path(cfg.paths.output_dir)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    strategy = instantiate(cfg.strategy) if isinstance(cfg.strategy, DictConfig) else cfg.strategy
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=instantiate_callbacks(cfg.get("callbacks")),
                          logger=instantiate_loggers(cfg.get("logger")) or False)

    start = time.time()
    workers = WorkerProcesses(trainer, cfg, output_dir) if WorkerProcesses.needed(trainer) else None
    if workers is not None:
        workers.__enter__()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
        fit_metrics = {k: _scalar(v) for k, v in trainer.callback_metrics.items()}
        test_metrics: dict[str, Any] = {}
        if cfg.get("test"):
            results = trainer.test(model, datamodule=datamodule, verbose=False)
            test_metrics = {k: _scalar(v) for k, v in (results[0] if results else {}).items()}
    except BaseException:
        if workers is not None:
            workers.__exit__(*sys.exc_info())
        raise
    if workers is not None:
        workers.__exit__(None, None, None)
    runtime = time.time() - start

    metrics = {**fit_metrics, **test_metrics}
    if is_worker or trainer.global_rank != 0:
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
    _print_summary(result, cfg)
    return metrics


def _print_summary(result: dict[str, Any], cfg: DictConfig) -> None:
    metrics = result["metrics"]
    which = "consensus model" if result.get("gossip") else "model"
    lines = ["", "=" * 80]
    if "test/acc" in metrics:
        lines.append(f"Test accuracy of the {which} ({result['strategy']}, {result['num_devices']} worker(s)): "
                     f"{metrics['test/acc']:.4f}   (test/loss {metrics.get('test/loss', float('nan')):.4f})")
    if "val/acc" in metrics:
        lines.append(f"Final val/acc {metrics['val/acc']:.4f}; best val/acc {metrics.get('val/acc_best', float('nan')):.4f}")
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
    """Ranks 1..M-1: run the job's resolved config without Hydra (no argv parsing, no output folders)."""
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    run(cfg)


def main() -> None:
    if WORKER_CONFIG_ENV in os.environ:
        _worker_main(os.environ[WORKER_CONFIG_ENV])
        return
    import hydra

    @hydra.main(version_base="1.3", config_path="../conf", config_name="train")
    def _hydra_main(cfg: DictConfig) -> Optional[float]:
        metrics = run(cfg)
        value = metrics.get("test/acc", metrics.get("val/acc"))
        return float(value) if value is not None else None  # for hydra sweepers (e.g. optuna)

    _hydra_main()


if __name__ == "__main__":
    main()
