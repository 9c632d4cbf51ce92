"""The combination matrix, Trainer side: several fits in ONE process tree (Lightning's popen launcher re-runs this
script per rank; the fits run one after another in the same processes, as a sweep loop or a notebook would), each
a cell of {lock-step, asynchronous} x the Lightning features users combine. Gossip's invariant checks are on
(LIGHTNING_GOSSIP_VERIFY=1 from the test), so a lost message, created mass, a consensus moved by looking at it or a
sample used twice raises inside the cell that caused it.

    python trainer_cells.py OUT --mode {lockstep,async} [--package {lightning,pytorch_lightning}] [--devices 2]

Each rank writes OUT/rank{r}.pt: per cell, what the test asserts on.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

N = 96  # samples; batch 8: 12 batches an epoch over all ranks
BATCH = 8


class IndexedBlobs(Dataset):
    def __init__(self, n: int, seed: int = 1234) -> None:
        g = torch.Generator().manual_seed(seed)
        centers = torch.randn(3, 8, generator=g) * 3
        self.y = torch.randint(0, 3, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, 8, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def build(pl):
    class Model(pl.LightningModule):
        def __init__(self, one_cycle: bool = False, manual: bool = False) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
            self.one_cycle = one_cycle
            self.automatic_optimization = not manual
            self.seen: dict[int, list[int]] = {}
            self.scheduler_steps = 0
            self.estimated = None

        def training_step(self, batch, batch_idx):
            x, y, idx = batch
            self.seen.setdefault(self.current_epoch, []).extend(idx.tolist())
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, on_step=True, on_epoch=True)
            if not self.automatic_optimization:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                opt.step()
            return loss

        def validation_step(self, batch, batch_idx):
            x, y, _ = batch
            self.log("val_loss", nn.functional.cross_entropy(self.net(x), y), sync_dist=True)

        def test_step(self, batch, batch_idx):
            x, y, _ = batch
            accuracy = (self.net(x).argmax(1) == y).float().mean()
            self.log("test_acc", accuracy, sync_dist=True)

        def configure_optimizers(self):
            optimizer = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
            if not self.one_cycle:
                return optimizer
            self.estimated = self.trainer.estimated_stepping_batches
            scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=self.estimated)
            return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

        def lr_scheduler_step(self, scheduler, metric):
            self.scheduler_steps += 1
            scheduler.step()

        def train_dataloader(self):
            return DataLoader(IndexedBlobs(N), batch_size=BATCH, shuffle=True)

        def val_dataloader(self):
            return DataLoader(IndexedBlobs(32, seed=7), batch_size=8)

        def test_dataloader(self):
            return DataLoader(IndexedBlobs(32, seed=9), batch_size=8)

    return Model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--mode", choices=["lockstep", "async"], required=True)
    parser.add_argument("--package", choices=["lightning", "pytorch_lightning"], default="lightning")
    parser.add_argument("--devices", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    if args.package == "lightning":
        pl = importlib.import_module("lightning.pytorch")
        from lightning_gossip import GossipStrategy
    else:
        pl = importlib.import_module("pytorch_lightning")
        from lightning_gossip.standalone import GossipStrategy
    Model = build(pl)
    asynchronous = args.mode == "async"
    cells: dict[str, dict] = {}

    def trainer(**kwargs):
        kwargs.setdefault("max_epochs", 2)
        strategy = GossipStrategy(p=0.5, asynchronous=asynchronous, monitor=kwargs.pop("monitor", True))
        return pl.Trainer(accelerator="cpu", devices=args.devices, strategy=strategy, logger=False,
                          enable_progress_bar=False, enable_model_summary=False, **kwargs)

    def record(name: str, t, model, **extra) -> None:
        params = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        cells[name] = {"seen": model.seen, "params": params, "counters": t.strategy.counters.as_dict(),
                       "gossip_weight": t.strategy.gossip_weight, "epochs": t.current_epoch,
                       "verified": t.strategy.averager.verifier.checks if t.strategy.averager.verifier else 0,
                       **extra}

    pl.seed_everything(0)
    # 1. validation with the monitor, top-k and last checkpoints, EarlyStopping, OneCycleLR from the estimate
    model = Model(one_cycle=True)
    ckpt_dir = out / "ckpt"
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", save_top_k=2, save_last=True)
    t = trainer(callbacks=[checkpoint, pl.callbacks.EarlyStopping(monitor="val_loss", patience=20)])
    t.fit(model)
    record("full", t, model, estimated=model.estimated, scheduler_steps=model.scheduler_steps,
           best=checkpoint.best_model_path, last=checkpoint.last_model_path,
           lr=t.optimizers[0].param_groups[0]["lr"])
    # 2. the best checkpoint, tested
    results = t.test(model, ckpt_path="best")
    cells["test_best"] = {"test_acc": results[0]["test_acc"]}
    # 3. a second Trainer in the same process, no monitor (validation alone looks at the consensus)
    model = Model()
    t = trainer(monitor=False)
    t.fit(model)
    record("second_fit_no_monitor", t, model)
    # 4. resume the first fit from its last checkpoint for one more epoch
    model = Model()
    t = trainer(max_epochs=3)
    t.fit(model, ckpt_path=str(ckpt_dir / "last.ckpt"))
    record("resume_last", t, model)
    # 5. max_time stops the fit; 6. the next Trainer in the process runs its whole epochs
    model = Model()
    t = trainer(max_epochs=1000, max_time={"seconds": 3})
    start = time.monotonic()
    t.fit(model)
    record("max_time", t, model, seconds=time.monotonic() - start)
    model = Model()
    t = trainer(max_epochs=2)
    t.fit(model)
    record("after_max_time", t, model)
    # 7. gradient accumulation with bf16-mixed
    model = Model()
    t = trainer(max_epochs=1, accumulate_grad_batches=2, precision="bf16-mixed")
    t.fit(model)
    record("accumulation_bf16", t, model)
    # 8. manual optimization
    model = Model(manual=True)
    t = trainer(max_epochs=1)
    t.fit(model)
    record("manual", t, model)
    # 9. fast_dev_run
    model = Model()
    t = trainer(fast_dev_run=True)
    t.fit(model)
    record("fast_dev_run", t, model)
    rank = t.global_rank
    cells["modules"] = sorted(m for m in sys.modules if m == "lightning" or m.startswith("lightning."))
    torch.save(cells, out / f"rank{rank}.pt")


if __name__ == "__main__":
    main()
