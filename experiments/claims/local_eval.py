"""Evaluate every worker's OWN model (not the consensus) for the exploration claim.

Under gossip, Lightning's validation sees the consensus model (GossipStrategy(eval_mode="consensus")). This callback
additionally evaluates, at the end of every training epoch, each rank's local weights on the whole validation set,
gathers the results on all ranks and logs them from rank 0 as ``local/acc_rank<i>``, ``local/loss_rank<i>``,
``local/acc_mean``, ``local/acc_min``, ``local/acc_max``. At the end of fit, before the strategy's final consensus
replaces the local weights, it evaluates each local model on the test set and rank 0 writes everything to
``<output_dir>/local_models.json``.

It needs a datamodule with ``val_set``/``test_set`` (``lightning_gossip.app.data``). Every rank must run it (it is a
collective), which holds since callbacks run on every rank.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch.nn import functional as F


@torch.no_grad()
def evaluate(module: torch.nn.Module, dataset: Any, batch_size: int = 512) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``module`` on a TensorDataset, in eval mode; the mode is restored."""
    was_training = module.training
    module.eval()
    x_all, y_all = dataset.tensors
    device = next(module.parameters()).device
    correct, loss_sum = 0, 0.0
    for start in range(0, len(y_all), batch_size):
        x = x_all[start : start + batch_size].to(device)
        y = y_all[start : start + batch_size].to(device)
        logits = module(x)
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
    module.train(was_training)
    return correct / len(y_all), loss_sum / len(y_all)


def _gather(values: list[float], device: torch.device) -> list[list[float]]:
    """Every rank's ``values`` (rank order); works without a process group too."""
    mine = torch.tensor(values, dtype=torch.float64, device=device)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [mine.tolist()]
    everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, mine)
    return [t.tolist() for t in everyone]


class LocalModelEval(Callback):
    """Per-worker accuracy of the local models each epoch (logged) and on the test set at the end (JSON)."""

    def __init__(self, filename: str = "local_models.json") -> None:
        self.filename = filename
        self.history: list[dict[str, Any]] = []
        self.final: Optional[dict[str, Any]] = None

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        val_set = getattr(trainer.datamodule, "val_set", None)
        if val_set is None:
            return
        acc, loss = evaluate(pl_module, val_set)
        rows = _gather([acc, loss], pl_module.device)
        accs = [r[0] for r in rows]
        metrics = {f"local/acc_rank{i}": a for i, a in enumerate(accs)}
        metrics.update({f"local/loss_rank{i}": r[1] for i, r in enumerate(rows)})
        metrics.update({"local/acc_mean": sum(accs) / len(accs), "local/acc_min": min(accs),
                        "local/acc_max": max(accs)})
        # The values are the same on every rank (all-gathered), so no further sync is needed.
        pl_module.log_dict(metrics, on_step=False, on_epoch=True, sync_dist=False)
        self.history.append({"epoch": trainer.current_epoch, "local_val_acc": accs,
                             "local_val_loss": [r[1] for r in rows]})

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Callbacks' on_train_end runs before the strategy's, i.e. before the final consensus: weights are local.
        test_set = getattr(trainer.datamodule, "test_set", None)
        if test_set is None:
            return
        acc, loss = evaluate(pl_module, test_set)
        rows = _gather([acc, loss], pl_module.device)
        self.final = {"local_test_acc": [r[0] for r in rows], "local_test_loss": [r[1] for r in rows]}
        if trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            (root / self.filename).write_text(json.dumps({"epochs": self.history, **self.final}, indent=2))
