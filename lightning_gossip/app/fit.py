"""One rank's run of a composed config: build the datamodule, model, strategy, callbacks, loggers and Trainer, fit,
test, and (rank 0) write and print the results."""

from __future__ import annotations

import signal
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig

from lightning_gossip.app import results
from lightning_gossip.app.checkpoints import resume_path


def configure_process(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.get("threads_per_worker") or 1))
    if (cfg.get("extras") or {}).get("ignore_warnings"):
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", ".*Consider setting `persistent_workers=True`.*")
        warnings.filterwarnings("ignore", ".*The number of training batches.*smaller than the logging interval.*")
        # lightning_gossip.app.models logs values that torchmetrics already synced over ranks
        warnings.filterwarnings("ignore", ".*when logging on epoch level in distributed setting.*")
        warnings.filterwarnings("ignore", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


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


def fit_and_test(cfg: DictConfig) -> dict[str, Any]:
    """Fit (and test, with ``test: true``) this rank; rank 0 writes ``results.json`` and prints the summary."""
    import lightning.pytorch as pl
    from hydra.utils import instantiate
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    strategy = instantiate(cfg.strategy) if isinstance(cfg.strategy, DictConfig) else cfg.strategy
    trainer = instantiate(cfg.trainer, strategy=strategy, callbacks=instantiate_callbacks(cfg.get("callbacks")),
                          logger=instantiate_loggers(cfg.get("logger")) or False)

    start = time.time()
    try:
        trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(cfg))
    except SIGTERMException as err:
        # Lightning ends a fit stopped by SIGTERM with SystemExit() (exit code 0): the job did not finish, and an
        # elastic agent or a scheduler must not count it as a success.
        raise SystemExit(128 + int(signal.SIGTERM)) from err
    metrics = results.metrics_of(trainer.callback_metrics)
    if cfg.get("test"):
        tested = trainer.test(model, datamodule=datamodule, verbose=False)
        metrics.update(results.metrics_of(tested[0] if tested else {}))
    runtime = time.time() - start
    if trainer.global_rank != 0:
        return metrics
    result = results.collect(cfg, trainer, metrics, runtime)
    results.write(Path(cfg.paths.output_dir), result)
    results.print_summary(result)
    return metrics
