"""Gossip training with a plain Lightning ``Trainer``: your LightningModule, your data, ``strategy="gossip"``.

    python examples/trainer.py                              # 4 CPU worker processes, 10 epochs
    python examples/trainer.py --devices 2 --epochs 2       # smaller
    python examples/trainer.py --asynchronous               # GoSGD as published: no rank waits for another

Lightning's launcher re-runs this command, arguments included, once per extra worker (as with DDP). The data is
scikit-learn's digits (shipped with scikit-learn, no download). Every worker trains its own copy of the model on its
own shard; validation and test see the exact consensus (the weighted average of all workers' models), and after
``fit`` every worker holds it.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gossip


class DigitsClassifier(L.LightningModule):
    """An ordinary LightningModule: nothing in it knows about gossip."""

    def __init__(self, hidden: int = 64, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch, stage: str) -> None:
        x, y = batch
        logits = self.net(x)
        self.log(f"{stage}/loss", nn.functional.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", (logits.argmax(1) == y).float().mean(), sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def digits_loaders(batch_size: int) -> tuple[DataLoader, DataLoader, DataLoader]:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    x_train, x_val, y_train, y_val = train_test_split(x_train, y_train, test_size=0.1, random_state=0)
    # Lightning gives every worker its own shard of the training set (its DistributedSampler, equal lengths)
    train = DataLoader(TensorDataset(x_train, y_train), batch_size=batch_size, shuffle=True)
    val = DataLoader(TensorDataset(x_val, y_val), batch_size=256)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=256)
    return train, val, test


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4, help="worker processes")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--p", type=float, default=0.1, help="gossip probability per worker and step")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--asynchronous", action="store_true", help="no rank waits for another during an epoch")
    args = parser.parse_args()

    torch.set_num_threads(1)  # several worker processes share the CPU cores
    L.seed_everything(0)  # the same initial model everywhere; also seeds the gossip schedule
    strategy = lightning_gossip.GossipStrategy(p=args.p, asynchronous=args.asynchronous)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=strategy,
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    train, val, test = digits_loaders(args.batch_size)
    model = DigitsClassifier()
    trainer.fit(model, train, val)
    # after fit every worker holds the exact consensus; test evaluates it
    (result,) = trainer.test(model, test, verbose=False)
    if trainer.is_global_zero:
        counters = trainer.strategy.counters
        print(
            f"consensus test accuracy {result['test/acc']:.3f} after {trainer.global_step} steps per worker; "
            f"rank 0 sent {counters.messages_sent} messages ({counters.bytes_sent} bytes)"
        )


if __name__ == "__main__":
    main()
