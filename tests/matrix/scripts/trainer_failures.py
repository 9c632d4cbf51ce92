"""The combination matrix's cells that must end in a clear error (or a clean stop), each its own 2-rank run:

    python trainer_failures.py OUT CELL [--package {lightning,pytorch_lightning}]

CELL:
- ``lockstep-iterable-uneven``: an IterableDataset whose rank 1 yields fewer batches (lock-step): GossipScheduleError.
- ``lockstep-manual-skip``: manual optimization, rank 1 skips one ``opt.step()`` (lock-step): GossipScheduleError.
- ``async-sync-dist-in-callback``: ``pl_module.log(..., sync_dist=True)`` in a callback's ``on_train_batch_end``
  (asynchronous): AsynchronousModeError.
- ``{lockstep,async}-sigterm``: trains until SIGTERM (sent by the test to rank 1's pid, written to OUT/pid1).
- ``{lockstep,async}-rank-raises``: rank 1 raises in training_step at its 5th step.

The process-group timeout is 300 s: an error must come from gossip's own checks, within seconds.
"""

from __future__ import annotations

import argparse
import importlib
import os
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset


class UnevenStream(IterableDataset):
    """Rank 1 yields 6 batches an epoch, the others 8 (ranks that take different numbers of steps)."""

    def __iter__(self):
        import torch.distributed as dist

        batches = 6 if dist.get_rank() == 1 else 8
        g = torch.Generator().manual_seed(dist.get_rank())
        for _ in range(batches):
            x = torch.randn(8, 8, generator=g)
            yield x, (x.sum(1) > 0).long()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("cell")
    parser.add_argument("--package", choices=["lightning", "pytorch_lightning"], default="lightning")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out_dir)
    if args.package == "lightning":
        pl = importlib.import_module("lightning.pytorch")
        from lightning_gossip import GossipStrategy
    else:
        pl = importlib.import_module("pytorch_lightning")
        from lightning_gossip.standalone import GossipStrategy
    cell = args.cell
    asynchronous = cell.startswith("async")
    manual = cell == "lockstep-manual-skip"

    class Model(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
            self.automatic_optimization = not manual
            self.steps = 0

        def on_train_start(self) -> None:
            (out / f"pid{self.global_rank}").write_text(str(os.getpid()))

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = nn.functional.cross_entropy(self.net(x), y)
            self.steps += 1
            if cell.endswith("rank-raises") and self.global_rank == 1 and self.steps == 5:
                raise RuntimeError("rank 1 failed on purpose in its 5th training step")
            if manual:
                opt = self.optimizers()
                opt.zero_grad()
                self.manual_backward(loss)
                if not (self.global_rank == 1 and batch_idx == 2):  # rank 1 skips one optimizer step
                    opt.step()
            if cell.endswith("sigterm"):
                import time

                time.sleep(0.01)
            return loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

        def train_dataloader(self):
            if cell == "lockstep-iterable-uneven":
                return DataLoader(UnevenStream(), batch_size=None)
            g = torch.Generator().manual_seed(0)
            x = torch.randn(256, 8, generator=g)
            return DataLoader(TensorDataset(x, (x.sum(1) > 0).long()), batch_size=8, shuffle=True)

    class LogsSyncDistPerBatch(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pl_module.log("synced", torch.tensor(1.0), sync_dist=True)

    callbacks = [LogsSyncDistPerBatch()] if cell == "async-sync-dist-in-callback" else []
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, max_epochs=1000 if cell.endswith("sigterm") else 2, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=callbacks,
        strategy=GossipStrategy(p=1.0 if not asynchronous else 0.5, topology="ring", asynchronous=asynchronous,
                                timeout=timedelta(seconds=300)),
    )
    trainer.fit(Model())
    (out / f"finished{trainer.global_rank}").write_text("1")


if __name__ == "__main__":
    main()
