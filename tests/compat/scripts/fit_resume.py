"""Gossip fit, checkpoint and exact resume with either Lightning package:
``python fit_resume.py OUT --package {lightning,pytorch_lightning} [--devices N]``.

Lightning's popen launcher re-runs this script per rank. Three fits in the same processes: (a) 1 epoch with a
checkpoint, (b) resume (a)'s checkpoint for a second epoch, (c) 2 epochs straight. Resuming is exact when (b) ends
where (c) does. Each rank writes ``OUT/rank{r}.pt``.
"""

import argparse
import importlib
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--package", choices=["lightning", "pytorch_lightning"], required=True)
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    if args.package == "lightning":
        pl = importlib.import_module("lightning.pytorch")
        from lightning_gossip import GossipStrategy
    else:
        pl = importlib.import_module("pytorch_lightning")
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
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)  # momentum: optimizer state matters

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(80, 8, generator=g), torch.randint(0, 3, (80,), generator=g))

    def fit(epochs: int, checkpoint_dir=None, ckpt_path=None):
        pl.seed_everything(2)  # the gossip schedule of seed 2 sends in every step but one of epoch 1
        trainer = pl.Trainer(
            accelerator="cpu", devices=args.devices, strategy=GossipStrategy(p=0.5), max_epochs=epochs,
            logger=pl.loggers.CSVLogger(args.out, name="logs"), log_every_n_steps=1,
            enable_checkpointing=checkpoint_dir is not None,
            callbacks=[pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, save_last=True)] if checkpoint_dir else [],
            enable_progress_bar=False, enable_model_summary=False)
        model = Classifier()
        trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True), ckpt_path=ckpt_path)
        return trainer, model

    first, model = fit(1, checkpoint_dir=os.path.join(args.out, "ckpt"))
    strategy = first.strategy
    record = {
        "strategy_mro": [f"{c.__module__}.{c.__qualname__}" for c in type(strategy).__mro__],
        "monitor_callbacks": [type(cb).__module__ for cb in first.callbacks if type(cb).__name__ == "GossipMonitor"],
        "logged": sorted(first.logged_metrics),
        "counters": strategy.counters.as_dict(),
        "first_final": torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone(),
        "first_local": torch.stack(model.local_params),
        "first_steps": first.global_step,
    }
    resumed, model = fit(2, ckpt_path=os.path.join(args.out, "ckpt", "last.ckpt"))
    record.update(resumed_steps=resumed.global_step, resumed_gossip_step=resumed.strategy.gossip_step,
                  resumed_local=torch.stack(model.local_params),
                  resumed_final=torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    straight, model = fit(2)
    record.update(straight_local=torch.stack(model.local_params),
                  straight_final=torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
    torch.save(record, os.path.join(args.out, f"rank{first.global_rank}.pt"))


if __name__ == "__main__":
    main()
