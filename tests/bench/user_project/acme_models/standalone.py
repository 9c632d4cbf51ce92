"""The same kind of model written against the standalone ``pytorch_lightning`` package."""

import pytorch_lightning as pl
import torch
from torch import nn


class StandaloneBlobClassifier(pl.LightningModule):
    def __init__(self, in_dim: int = 8, classes: int = 4) -> None:
        super().__init__()
        self.net = nn.Linear(in_dim, classes)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)
