"""Starting a job's worker processes: ``torchrun`` as a library, and the workers' side of it.

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
import os
import signal
import sys
import uuid
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_gossip.app.failures import describe_failures, restarts_note
from lightning_gossip.app.results import RESULTS_FILE

log = logging.getLogger("lightning_gossip.train")

WORKER_CONFIG_ENV = "LIGHTNING_GOSSIP_WORKER_CONFIG"
# the pid of the Hydra process that started a worker: a worker whose parent is gone stops (see die_with_parent)
PARENT_PID_ENV = "LIGHTNING_GOSSIP_PARENT_PID"
_DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "LOCAL_WORLD_SIZE")
_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])
_HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def is_worker() -> bool:
    """Whether this process is a worker started by :class:`ElasticWorkers` (it runs the saved config, no Hydra)."""
    return WORKER_CONFIG_ENV in os.environ


def worker_processes_needed(cfg: DictConfig) -> Optional[int]:
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


def restartable_single_process(cfg: DictConfig) -> int:
    """max_restarts with a single-process strategy: 1 worker process under the agent (spawn: refused)."""
    strategy = cfg.get("strategy")
    if isinstance(strategy, DictConfig) and strategy.get("start_method") not in (None, "popen"):
        raise ValueError(f"max_restarts={cfg.max_restarts} needs worker processes started by this entry point "
                         f"(strategy.start_method=popen), got strategy.start_method={strategy.start_method!r}.")
    return 1


class ElasticWorkers:
    """Run every rank of one job as a fresh ``python -m lightning_gossip.train`` process, through torch's elastic agent.

    This is ``torchrun`` used as a library (:func:`torch.distributed.launcher.api.elastic_launch`): a c10d rendezvous
    on 127.0.0.1 with a free port and a fresh run id per job, ``nproc_per_node`` worker processes, and with
    ``max_restarts`` > 0 a worker group that is restarted when one of its processes fails. A restarted group resumes
    from the job's last checkpoint by itself (see :func:`lightning_gossip.app.checkpoints.resume_path`). The Hydra
    process only starts the agent and waits; the agent stops every worker (SIGTERM, then SIGKILL after
    ``shutdown_timeout`` seconds) when one fails for good, when it is signalled, or when the job ends.

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
            raise RuntimeError(f"Worker processes failed{restarts_note(self.max_restarts)} "
                               f"({describe_failures(err.failures)}); their errors are printed above "
                               f"(config: {self.config_path}).") from None
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


def die_with_parent() -> None:
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
