"""Gossip training with the standalone ``pytorch_lightning`` package: ``python pl_fit.py OUT [--devices N]``.

Lightning's popen launcher re-runs this script per rank. Fits 2 epochs with a checkpoint per epoch, then resumes the
last checkpoint for a third epoch; each rank writes ``OUT/rank{r}.pt``.
"""

import argparse
import os

import pytorch_lightning as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gossip.standalone import GossipStrategy


class Classifier(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.local_params: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, *args) -> None:
        self.local_params.append(torch.nn.utils.parameters_to_vector(self.parameters()).detach().clone())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl.seed_everything(3)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(80, 8, generator=g), torch.randint(0, 3, (80,), generator=g))

    def trainer(epochs: int) -> pl.Trainer:
        return pl.Trainer(accelerator="cpu", devices=args.devices, strategy=GossipStrategy(p=0.5), max_epochs=epochs,
                          logger=pl.loggers.CSVLogger(args.out, name="logs"), log_every_n_steps=1,
                          callbacks=[pl.callbacks.ModelCheckpoint(dirpath=args.out, save_last=True)],
                          enable_progress_bar=False, enable_model_summary=False)

    first = trainer(2)
    model = Classifier()
    first.fit(model, DataLoader(data, batch_size=8, shuffle=True))
    strategy = first.strategy
    record = {
        "strategy_mro": [f"{c.__module__}.{c.__qualname__}" for c in type(strategy).__mro__],
        "monitor_callbacks": [type(cb).__module__ for cb in first.callbacks if type(cb).__name__ == "GossipMonitor"],
        "logged": sorted(first.logged_metrics),
        "counters": strategy.counters.as_dict(),
        "final_params": torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone(),
        "local_params": torch.stack(model.local_params),
        "steps": first.global_step,
    }
    resumed = trainer(3)
    again = Classifier()
    resumed.fit(again, DataLoader(data, batch_size=8, shuffle=True), ckpt_path=os.path.join(args.out, "last.ckpt"))
    record["resumed_steps"] = resumed.global_step
    record["resumed_gossip_step"] = resumed.strategy.gossip_step
    record["resumed_final_params"] = torch.nn.utils.parameters_to_vector(again.parameters()).detach().clone()
    torch.save(record, os.path.join(args.out, f"rank{first.global_rank}.pt"))


if __name__ == "__main__":
    main()
