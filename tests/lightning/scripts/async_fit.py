"""Asynchronous gossip under Lightning, recording what each rank did, for tests/lightning/test_async_lightning.py.

Run as ``python async_fit.py OUT_DIR [--devices N] [--slow-rank R --slowdown K] [--epochs E] [--ckpt PATH]``;
Lightning's popen launcher re-runs this script once per rank. Each rank writes ``OUT_DIR/rank{r}.pt``: the sample
indices it trained on per epoch, its optimizer steps, its weights and gossip weight after fit, and (when resuming
with ``--ckpt``) its weights, gossip weight and optimizer state right after the checkpoint was restored.
"""

import argparse
import copy
import os
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_gossip


class IndexedBlobs(Dataset):
    """A fixed synthetic classification set whose items carry their own index, to see who trained on what."""

    def __init__(self, n: int, dim: int = 8, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(1234)
        self.centers = torch.randn(classes, dim, generator=g) * 3
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = self.centers[self.y] + torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Model(L.LightningModule):
    def __init__(
        self,
        step_seconds: float,
        slow_rank: int,
        slowdown: float,
        n: int,
        batch_size: int,
        out_dir: str,
        sync_dist_on_step: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.seen: dict[int, list[int]] = {}
        self.restored = None

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen.setdefault(self.current_epoch, []).extend(idx.tolist())
        # The emulated compute: one rank is `slowdown` times slower, inside its training_step.
        slow = self.global_rank == self.hparams.slow_rank
        time.sleep(self.hparams.step_seconds * (self.hparams.slowdown if slow else 1.0))
        loss = nn.functional.cross_entropy(self.net(x), y)
        # Per-rank on step, reduced at the epoch's end (sync_dist on step is refused in asynchronous mode).
        self.log("train_loss", loss, on_step=True, on_epoch=True, sync_dist=self.hparams.sync_dist_on_step)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", nn.functional.cross_entropy(self.net(x), y), sync_dist=True)

    def on_train_start(self) -> None:
        # For the SIGTERM test: which process is which rank.
        with open(os.path.join(self.hparams.out_dir, f"pid{self.global_rank}"), "w") as f:
            f.write(str(os.getpid()))
        if self.trainer.ckpt_path:
            optimizer = self.trainer.optimizers[0]
            self.restored = {
                "model": {k: v.detach().clone() for k, v in self.state_dict().items()},
                "gossip_weight": self.trainer.strategy.gossip_weight,
                "optimizer": copy.deepcopy(optimizer.state_dict()),  # live buffers otherwise
            }

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):
        return DataLoader(IndexedBlobs(self.hparams.n), batch_size=self.hparams.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(IndexedBlobs(64), batch_size=16)


def _strategy(p: float):
    return lightning_gossip.GossipStrategy(p=p, asynchronous=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--n", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--step-seconds", type=float, default=0.01)
    parser.add_argument("--slow-rank", type=int, default=-1)
    parser.add_argument("--slowdown", type=float, default=1.0)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--ckpt", default=None)
    parser.add_argument("--max-seconds", type=float, default=None)
    parser.add_argument("--sync-dist-on-step", action="store_true")
    parser.add_argument("--strategy-name", default=None, help="a registry name instead of GossipStrategy(p=...)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    L.seed_everything(0)
    model = Model(
        args.step_seconds, args.slow_rank, args.slowdown, args.n, args.batch_size, args.out_dir, args.sync_dist_on_step
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=args.strategy_name or _strategy(args.p),
        max_epochs=args.epochs,
        max_time=None if args.max_seconds is None else {"seconds": args.max_seconds},
        callbacks=[ModelCheckpoint(dirpath=os.path.join(args.out_dir, "ckpt"), save_last=True, save_top_k=-1)],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start = time.monotonic()
    trainer.fit(model, ckpt_path=args.ckpt)
    seconds = time.monotonic() - start
    strategy = trainer.strategy
    record = {
        "seen": model.seen,
        "steps": strategy.averager.step_count if strategy.averager is not None else trainer.global_step,
        "global_step": trainer.global_step,
        "gossip_weight": strategy.gossip_weight,
        "params": torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone(),
        "restored": model.restored,
        "seconds": seconds,
        "counters": strategy.counters.as_dict(),
        "epochs": trainer.current_epoch,
    }
    torch.save(record, os.path.join(args.out_dir, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
