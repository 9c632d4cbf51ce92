"""A user's own LightningModule, trained by the Hydra app (``python -m lightning_gossip.train``) through a config of
its own. Nothing here knows about gossip or Hydra; ``model/my_model.yaml`` names this class by its import path.

The app's default callbacks keep the best checkpoint by ``val/acc`` and its summary prints ``test/acc``, so the
module logs those two; the app's datamodules yield ``(x, y)`` batches with ``x`` of shape ``data.input_shape``.
"""

from __future__ import annotations

import math
from typing import Sequence

import lightning as L
import torch
from torch import nn


class MyClassifier(L.LightningModule):
    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: int = 128, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch
        logits = self.net(x)
        # each rank evaluates its own slice of the set; sync_dist averages the ranks' values
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), sync_dist=True, prog_bar=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
