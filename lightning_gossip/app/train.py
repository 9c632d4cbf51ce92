"""The Hydra entry point: ``python -m lightning_gossip.train [overrides]`` (``-m`` for a multirun sweep).

It composes ``conf/train.yaml``, checks the config (:mod:`~lightning_gossip.app.checks`, before any process starts),
and then either trains here (one device, or the spawn start method) or starts the job's worker processes through
torch's elastic agent and waits for them (:mod:`~lightning_gossip.app.launch`, which explains why). Each rank
instantiates the datamodule, model, strategy, callbacks, loggers and trainer, fits and tests
(:mod:`~lightning_gossip.app.fit`); rank 0 writes ``results.json`` into the run's folder and prints the test
accuracy and where the logs and checkpoints went (:mod:`~lightning_gossip.app.results`). See ``conf/train.yaml``
for examples.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from lightning_gossip.app import launch, results
from lightning_gossip.app.checks import check_config, check_data, register_resolvers
from lightning_gossip.app.checkpoints import remove_stale_temporary_files
from lightning_gossip.app.fit import configure_process, fit_and_test


def run(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test) one composed config; returns the final metrics.

    In the Hydra process: starts the worker processes and waits for them when the strategy needs several (see
    :mod:`lightning_gossip.app.launch`), else trains here. In a worker process: trains this rank.
    """
    import lightning_gossip  # noqa: F401  (registers the gossip strategies)

    is_worker = launch.is_worker()
    if not is_worker:
        check_config(cfg)  # wrong types and values, a missing or unreadable ckpt_path: before any process starts
    configure_process(cfg)
    if not is_worker:
        if (cfg.get("extras") or {}).get("print_config"):
            print(OmegaConf.to_yaml(cfg, resolve=True), flush=True)
        max_restarts = int(cfg.get("max_restarts") or 0)
        world_size = launch.worker_processes_needed(cfg)
        if max_restarts and not world_size:
            world_size = launch.restartable_single_process(cfg)
        if world_size:
            check_data(cfg)  # a missing dataset path fails here, before any worker process starts
            output_dir = Path(cfg.paths.output_dir)
            remove_stale_temporary_files(cfg)
            result = launch.ElasticWorkers(cfg, output_dir, world_size, max_restarts=max_restarts,
                                           shutdown_timeout=int(cfg.get("shutdown_timeout") or 30)).run()
            hydra_info = results.hydra_info()
            if hydra_info:  # the workers run without Hydra: add what only this process knows
                result.update(hydra_info)
                results.write(output_dir, result)
            return result["metrics"]
    return fit_and_test(cfg)


def _worker_main(path: str) -> None:
    """A worker process (any rank): run the job's resolved config without Hydra (no argv parsing, no folders)."""
    launch.die_with_parent()
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise TypeError(f"{path} does not hold a job config (a mapping), got {type(cfg).__name__}.")
    run(cfg)


def main() -> None:
    if launch.is_worker():
        _worker_main(os.environ[launch.WORKER_CONFIG_ENV])
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
