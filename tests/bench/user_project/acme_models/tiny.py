"""Blob classification: a small MLP and a datamodule that generates its data (no download)."""

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


class BlobClassifier(L.LightningModule):
    def __init__(self, in_dim: int = 8, hidden: int = 16, classes: int = 4, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        self.log("val_loss", nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


class Blobs(L.LightningDataModule):
    def __init__(self, n: int = 1024, in_dim: int = 8, classes: int = 4, batch_size: int = 16, seed: int = 0) -> None:
        super().__init__()
        self.n, self.in_dim, self.classes, self.batch_size, self.seed = n, in_dim, classes, batch_size, seed

    def setup(self, stage=None):
        g = torch.Generator().manual_seed(self.seed)
        centres = torch.randn(self.classes, self.in_dim, generator=g) * 2.0
        y = torch.randint(0, self.classes, (self.n + self.n // 4,), generator=g)
        x = centres[y] + torch.randn(len(y), self.in_dim, generator=g)
        self.train_set = TensorDataset(x[: self.n], y[: self.n])
        self.val_set = TensorDataset(x[self.n :], y[self.n :])

    def train_dataloader(self):
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val_set, batch_size=256)


class BlobClassifierNoAsync(BlobClassifier):
    """The same model, written so that it breaks under an asynchronous strategy (as some models do): the benchmark
    must report that row as failed and still run the others."""

    def on_train_start(self):
        options = getattr(self.trainer.strategy, "options", None)
        if getattr(options, "asynchronous", False):
            raise RuntimeError("this model does not support asynchronous training")
