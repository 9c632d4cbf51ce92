"""A run's results: ``results.json`` in the run's folder (written by rank 0) and the summary printed at the end.

The sweep collector (:mod:`lightning_gossip.app.sweep`) reads these files back; the Hydra process reads the one its
workers wrote (:class:`~lightning_gossip.app.launch.ElasticWorkers`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

RESULTS_FILE = "results.json"


def scalar(value: Any) -> Any:
    """A metric as JSON holds it: a tensor as a number (or a list), a NaN or infinity as null."""
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def metrics_of(values: dict[str, Any]) -> dict[str, Any]:
    return {k: scalar(v) for k, v in values.items()}


def hydra_info() -> dict[str, Any]:
    """What only the Hydra process knows about the job (its overrides, choices, number in a multirun)."""
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


def strategy_stats(strategy: Any) -> dict[str, Any]:
    from lightning_gossip.strategy import GossipStrategy

    stats: dict[str, Any] = {"strategy": type(strategy).__name__, "gossip": isinstance(strategy, GossipStrategy)}
    if stats["gossip"]:
        stats["asynchronous"] = bool(strategy.options.asynchronous)
    # With the spawn launcher this process did not train (the averager lived in the spawned ranks): no counters.
    if stats["gossip"] and getattr(strategy, "averager", None) is not None:
        stats["gossip_counters"] = strategy.counters.as_dict()
        stats["gossip_weight"] = float(strategy.gossip_weight)
    return stats


def checkpoint_info(trainer: Any) -> dict[str, Any]:
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


def log_dirs(trainer: Any) -> dict[str, str]:
    return {type(lg).__name__: str(lg.log_dir) for lg in trainer.loggers if getattr(lg, "log_dir", None)}


def collect(cfg: DictConfig, trainer: Any, metrics: dict[str, Any], runtime_s: float) -> dict[str, Any]:
    """Rank 0's record of a finished run (the content of ``results.json``)."""
    return {
        "metrics": metrics,
        "runtime_s": round(runtime_s, 2),
        "world_size": int(trainer.world_size) if trainer.world_size else 1,
        "num_devices": int(trainer.num_devices),
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "seed": cfg.seed,
        "output_dir": str(Path(cfg.paths.output_dir)),
        "log_dirs": log_dirs(trainer),
        **checkpoint_info(trainer),
        **strategy_stats(trainer.strategy),
        **hydra_info(),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write(output_dir: Path, result: dict[str, Any]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / RESULTS_FILE).write_text(json.dumps(result, indent=2, default=str))


def print_summary(result: dict[str, Any]) -> None:
    metrics = result["metrics"]
    which = "consensus model" if result.get("gossip") else "model"
    lines = ["", "=" * 80]
    if "test/acc" in metrics:
        lines.append(f"Test accuracy of the {which} ({result['strategy']}, {result['num_devices']} worker(s)): "
                     f"{metrics['test/acc']:.4f}   (test/loss {metrics.get('test/loss', float('nan')):.4f})")
    if "val/acc" in metrics:
        best = metrics.get("val/acc_best", float("nan"))
        lines.append(f"Final val/acc {metrics['val/acc']:.4f}; best val/acc {best:.4f}")
    # asynchronous gossip shares the data out dynamically: every rank takes its own number of steps
    steps = "on rank 0 (asynchronous: each rank its own)" if result.get("asynchronous") else "per worker"
    lines.append(f"Epochs {result['epochs']}, steps {result['global_step']} {steps}, {result['runtime_s']:.1f} s")
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
