"""The project's own benchmark model as a user would write it: a LightningModule and a LightningDataModule.

``python -m lightning_gossip.bench --config experiments/benchmark/quick.yaml`` benchmarks them exactly as it
benchmarks anyone's model (the quick CI benchmark, compared against experiments/results/benchmark/quick/baseline.json).
They wrap the harness's MLP and its synthetic Gaussian-cluster data (:mod:`experiments.benchmark.common`).
"""

from __future__ import annotations

from typing import Any, Optional

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from experiments.benchmark.common import make_data, make_model


class ClusterMLP(L.LightningModule):
    """The harness's MLP (Linear, blocks x (LayerNorm, ReLU, Linear), LayerNorm, ReLU, Linear), SGD with momentum;
    logs ``val_acc`` and ``val_loss``."""

    def __init__(self, in_dim: int = 32, hidden: int = 32, blocks: int = 1, classes: int = 10, lr: float = 0.05,
                 momentum: float = 0.9) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = make_model({"in_dim": in_dim, "hidden": hidden, "blocks": blocks, "classes": classes})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class ClusterData(L.LightningDataModule):
    """The synthetic classification set of :func:`experiments.benchmark.common.make_data`, generated in-process."""

    def __init__(self, in_dim: int = 32, classes: int = 10, n_train: int = 4096, n_test: int = 1024,
                 clusters_per_class: int = 2, scale: float = 0.6, seed: int = 0, batch_size: int = 32) -> None:
        super().__init__()
        self.model_cfg = {"in_dim": in_dim, "classes": classes}
        self.data_cfg = {"n_train": n_train, "n_test": n_test, "clusters_per_class": clusters_per_class,
                         "scale": scale, "seed": seed}
        self.batch_size = batch_size
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None

    def setup(self, stage: Optional[str] = None) -> None:
        x, y, x_test, y_test = make_data(self.model_cfg, self.data_cfg)
        self.train_set, self.val_set = TensorDataset(x, y), TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=1024)
