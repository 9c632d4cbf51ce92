"""A Lightning training script that records what each rank did, for the tests to check.

Run as ``python fit_and_record.py OUT_DIR [--devices N] [--p P] ...`` (Lightning's own launcher re-runs this
script per rank) or under ``torchrun --nproc-per-node N fit_and_record.py OUT_DIR --torchrun``.
Each rank writes ``OUT_DIR/rank{r}.pt`` with the samples it saw, its weights and gossip weight per step, counters
and its final weights.
"""

import argparse
import os

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_gossip


class IndexedBlobs(Dataset):
    """A fixed synthetic classification set whose items carry their own index, to see who trained on what."""

    def __init__(self, n: int = 256, dim: int = 8, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(1234)
        self.centers = torch.randn(classes, dim, generator=g) * 3
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = self.centers[self.y] + torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


class Recorder(L.LightningModule):
    def __init__(self, lr: float = 0.1) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        self.seen: list[int] = []
        self.weights_per_step: list[float] = []
        self.params_per_step: list[torch.Tensor] = []
        self.params_at_validation: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y, idx = batch
        self.seen += idx.tolist()
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def on_train_batch_end(self, *args) -> None:
        strategy = self.trainer.strategy
        self.weights_per_step.append(getattr(strategy, "gossip_weight", 1.0))
        self.params_per_step.append(torch.nn.utils.parameters_to_vector(self.parameters()).detach().clone())

    def validation_step(self, batch, batch_idx):
        if batch_idx == 0:
            self.params_at_validation.append(torch.nn.utils.parameters_to_vector(self.parameters()).detach().clone())
        x, y, _ = batch
        acc = (self.net(x).argmax(1) == y).float().mean()
        self.log("val/acc", acc, sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--topology", default="random")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--staleness", type=int, default=None)
    parser.add_argument("--no-final-consensus", action="store_true")
    parser.add_argument("--eval-mode", default="consensus")
    parser.add_argument("--checkpoint", action="store_true", help="save a checkpoint at the end of every epoch")
    parser.add_argument("--strategy-name", default=None, help="use the registry string instead of the class")
    parser.add_argument("--torchrun", action="store_true", help="launched by torchrun: devices per node from env")
    args = parser.parse_args()

    torch.set_num_threads(1)
    L.seed_everything(7)
    if args.strategy_name:
        strategy = args.strategy_name
    else:
        strategy = lightning_gossip.GossipStrategy(
            p=args.p,
            topology=args.topology,
            overlap=args.overlap,
            staleness=args.staleness,
            final_consensus=not args.no_final_consensus,
            eval_mode=args.eval_mode,
        )
    devices = int(os.environ["LOCAL_WORLD_SIZE"]) if args.torchrun else args.devices
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        max_epochs=args.epochs,
        logger=L.pytorch.loggers.CSVLogger(args.out, name="logs"),
        enable_checkpointing=args.checkpoint,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=args.out, save_last=True)] if args.checkpoint else None,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    model = Recorder(lr=args.lr)
    data = IndexedBlobs()
    trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True), DataLoader(data, batch_size=64))
    s = trainer.strategy
    record = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "strategy": type(s).__name__,
        "seen": model.seen,
        "weights_per_step": model.weights_per_step,
        "params_per_step": torch.stack(model.params_per_step),
        "params_at_validation": torch.stack(model.params_at_validation),
        "final_params": torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone(),
        "local_params_before_end": model.params_per_step[-1],
        "gossip_weight": s.gossip_weight,
        "staleness": getattr(s, "staleness", None),
        "counters": s.counters.as_dict(),
        "message_bytes": s.averager.state.message_bytes if s.averager is not None else 0,
        "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "val_acc": float(trainer.callback_metrics.get("val/acc", float("nan"))),
        "logged_keys": sorted(trainer.logged_metrics),
    }
    os.makedirs(args.out, exist_ok=True)
    torch.save(record, os.path.join(args.out, f"rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
