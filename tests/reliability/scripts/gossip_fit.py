"""A small Lightning gossip run for the reliability tests: resume, killed workers, checkpoints killed mid-write.

Run as ``python gossip_fit.py OUT --devices N --plan JSON [options]``; Lightning's popen launcher re-runs this script
(with the same argv) once per extra rank. ``--plan`` is a JSON list of fits run one after another in the same
processes, each ``{"name": ..., "epochs": E, "ckpt_dir": DIR, "resume": PATH, "overlap": bool, "p": P,
"save_on_train_epoch_end": bool, "save_last": bool, "hidden": H, "filename": F}`` (all but
name and epochs optional). For every fit each
rank writes ``OUT/{name}_rank{r}.pt`` with what it held at the start and at the end of the fit: every tensor of the
model, the gossip weight, the schedule position, the message in flight, counters, optimizer state and the warnings.

Faults (for the tests of dead workers and preemption):
  --sleep-in-save N --sleep-s S rank 0 sleeps S seconds when it starts writing its part of the N-th checkpoint save
                                (after noting OUT/in_save.txt), so a signal sent then lands inside the save; every rank
                                notes its pid in OUT/pid_rank{r}.txt when training starts.
  --kill-in-validation R        rank R sends itself SIGKILL at the first batch of the 2nd validation (after the
                                consensus was swapped in; the others then fail in Lightning's sync_dist reduction).
  --uneven K                    rank r trains on a shard of n + K*r samples (no DistributedSampler): uneven epochs.
  --kill-rank R --kill-step S   rank R sends itself SIGKILL right after optimizer step S (global step S+1 done).
  --kill-in-save N              rank 0 sends itself SIGKILL just after it opens its N-th file for writing inside a
                                checkpoint directory (a crash in the middle of writing a checkpoint);
                                --kill-in-save-rank R: rank R instead (its N-th file: a part).
  --stop-rank R --stop-step S   rank R sends itself SIGSTOP right after optimizer step S (a hung rank: it never ends
                                by itself); every rank notes its pid in OUT/pid_rank{r}.txt when training starts.
  --asynchronous                GossipStrategy(asynchronous=True).
"""

import argparse
import builtins
import copy
import json
import os
import signal
import time
import warnings
from datetime import timedelta

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_gossip


class Blobs(Dataset):
    def __init__(self, n: int, dim: int = 8, classes: int = 3) -> None:
        g = torch.Generator().manual_seed(1234)
        centers = torch.randn(classes, dim, generator=g) * 3
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = centers[self.y] + torch.randn(n, dim, generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Net(L.LightningModule):
    def __init__(self, lr: float = 0.1, hidden: int = 16) -> None:
        super().__init__()
        self.lr = lr
        # BatchNorm: floating-point buffers that are gossiped, and an integer buffer that stays per rank.
        self.net = nn.Sequential(nn.Linear(8, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 3))
        self.start: dict = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.net(x).argmax(1) == y).float().mean(), sync_dist=True)

    def configure_optimizers(self):
        # Momentum: per-rank optimizer state that an exact resume must restore rank by rank.
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def on_train_start(self) -> None:
        self.start = snapshot(self.trainer)


def die(out: str, what: str) -> None:
    """SIGKILL this process, after noting when (OUT/fault.txt) for the tests' timing."""
    with open(os.path.join(out, "fault.txt"), "w") as f:
        f.write(f"{time.time()}\n{what}\n")
    print(f"FAULT: {what}", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)


class KillAtStep(L.Callback):
    def __init__(self, out: str, rank: int, step: int) -> None:
        self.out, self.rank, self.step = out, rank, step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step + 1:
            die(self.out, f"rank {self.rank} killed after optimizer step {self.step}")


def kill_in_save(out: str, nth: int, directories: list[str], rank: int = 0) -> None:
    """Crash (SIGKILL) right after the nth write-mode open of a file inside one of ``directories``."""
    real_open = builtins.open
    count = [0]
    roots = [os.path.abspath(d) + os.sep for d in directories]

    def open_(file, mode="r", *args, **kwargs):
        handle = real_open(file, mode, *args, **kwargs)
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wxa"):
            path = os.path.abspath(os.fspath(file))
            if any(path.startswith(root) for root in roots):
                count[0] += 1
                if count[0] == nth:
                    handle.write(b"partial")
                    handle.flush()
                    die(out, f"rank {rank} killed while writing {path}")
        return handle

    builtins.open = open_


class StopAtStep(L.Callback):
    """SIGSTOP: the process stays, every thread frozen (a wedged driver, a swapping host, a stuck filesystem)."""

    def __init__(self, out: str, rank: int, step: int) -> None:
        self.out, self.rank, self.step = out, rank, step

    def on_train_start(self, trainer, pl_module) -> None:
        with open(os.path.join(self.out, f"pid_rank{trainer.global_rank}.txt"), "w") as f:
            f.write(str(os.getpid()))

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step + 1:
            with open(os.path.join(self.out, "fault.txt"), "w") as f:
                f.write(f"{time.time()}\nrank {self.rank} stopped after optimizer step {self.step}\n")
            print(f"FAULT: rank {self.rank} stopped (SIGSTOP) after optimizer step {self.step}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)


class KillInValidation(L.Callback):
    def __init__(self, out: str, rank: int) -> None:
        self.out, self.rank = out, rank

    def on_validation_batch_start(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.current_epoch == 1 and not trainer.sanity_checking:
            die(self.out, f"rank {self.rank} killed in validation")


class SleepInSave(L.Callback):
    def __init__(self, out: str, nth: int, sleep_s: float) -> None:
        self.out, self.nth, self.sleep_s = out, nth, sleep_s

    def setup(self, trainer, pl_module, stage) -> None:
        io = trainer.strategy.checkpoint_io
        write, saves = io.save_checkpoint, [0]

        def slow_write(checkpoint, path, storage_options=None):
            if trainer.global_rank == 0 and ".parts" in str(path):  # the first write of a save: rank 0's part
                saves[0] += 1
                if saves[0] == self.nth:
                    with open(os.path.join(self.out, "in_save.txt"), "w") as f:
                        f.write(f"{time.time()}\n{path}\n")
                    print(f"SLEEP: rank 0 sleeps {self.sleep_s} s in save {self.nth} ({path})", flush=True)
                    time.sleep(self.sleep_s)
            return write(checkpoint, path, storage_options=storage_options)

        io.save_checkpoint = slow_write

    def on_train_start(self, trainer, pl_module) -> None:
        with open(os.path.join(self.out, f"pid_rank{trainer.global_rank}.txt"), "w") as f:
            f.write(str(os.getpid()))


def snapshot(trainer) -> dict:
    s = trainer.strategy
    module = trainer.lightning_module
    averager = getattr(s, "averager", None)
    # exchanges posted, not mixed in yet, oldest first
    pending = list(getattr(averager.exchange, "pending", ())) if averager is not None else []
    return {
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "gossip_weight": s.gossip_weight,
        "gossip_step": s.gossip_step,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "counters": s.counters.as_dict(),
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()) if trainer.optimizers else None,
        "in_flight": [
            {
                "step": p.step,
                "sources": [src for src, _ in p.received],
                "weights": [float(m[:32].view(torch.float64)[0]) for _, m in p.received],
                "messages": [m.clone() for _, m in p.received],
            }
            for p in pending
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--plan", required=True)
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--topology", default="random")
    parser.add_argument("--overlap", action="store_true")
    parser.add_argument("--final-consensus", action="store_true")
    parser.add_argument("--n", type=int, default=96, help="training samples (split over the ranks)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-step", type=int, default=None)
    parser.add_argument("--kill-in-save", type=int, default=None)
    parser.add_argument("--kill-in-save-rank", type=int, default=0)
    parser.add_argument("--sleep-in-save", type=int, default=None)
    parser.add_argument("--sleep-s", type=float, default=8.0)
    parser.add_argument("--uneven", type=int, default=0)
    parser.add_argument("--kill-in-validation", type=int, default=None)
    parser.add_argument("--stop-rank", type=int, default=None)
    parser.add_argument("--stop-step", type=int, default=None)
    parser.add_argument("--asynchronous", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    os.makedirs(args.out, exist_ok=True)
    plan = json.loads(args.plan)
    if args.kill_in_save and int(os.environ.get("LOCAL_RANK", "0")) == args.kill_in_save_rank:
        kill_in_save(args.out, args.kill_in_save, [run["ckpt_dir"] for run in plan if run.get("ckpt_dir")],
                     args.kill_in_save_rank)

    for run in plan:
        L.seed_everything(7, verbose=False)
        strategy = lightning_gossip.GossipStrategy(
            p=run.get("p", args.p),
            topology=args.topology,
            overlap=run.get("overlap", args.overlap),
            staleness=run.get("staleness"),
            final_consensus=args.final_consensus,
            timeout=timedelta(seconds=args.timeout_s),
            asynchronous=args.asynchronous,
        )
        callbacks: list = []
        if run.get("ckpt_dir"):
            callbacks.append(
                ModelCheckpoint(
                    dirpath=run["ckpt_dir"],
                    filename=run.get("filename", "epoch{epoch}"),
                    auto_insert_metric_name=False,
                    save_top_k=-1,
                    save_last=run.get("save_last", False),
                    enable_version_counter=False,
                    # False: save in on_validation_end, while eval_mode="consensus" has the consensus swapped in.
                    save_on_train_epoch_end=run.get("save_on_train_epoch_end"),
                )
            )
        if args.kill_rank is not None:
            callbacks.append(KillAtStep(args.out, args.kill_rank, args.kill_step))
        if args.stop_rank is not None:
            callbacks.append(StopAtStep(args.out, args.stop_rank, args.stop_step))
        if args.kill_in_validation is not None:
            callbacks.append(KillInValidation(args.out, args.kill_in_validation))
        if args.sleep_in_save is not None:
            callbacks.append(SleepInSave(args.out, args.sleep_in_save, args.sleep_s))
        trainer = L.Trainer(
            accelerator="cpu",
            devices=args.devices,
            strategy=strategy,
            max_epochs=run["epochs"],
            callbacks=callbacks,
            logger=False,
            enable_checkpointing=bool(run.get("ckpt_dir")),
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            deterministic=True,
            use_distributed_sampler=not args.uneven,
        )
        model = Net(hidden=run.get("hidden", 16))
        data = Blobs(args.n)
        train_data = data
        if args.uneven:
            rank = int(os.environ.get("LOCAL_RANK", "0"))
            train_data = torch.utils.data.Subset(data, range(min(len(data), args.n // 2 + args.uneven * rank)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(
                model,
                DataLoader(train_data, batch_size=args.batch, shuffle=True),
                DataLoader(data, batch_size=48),
                ckpt_path=run.get("resume"),
            )
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "start": model.start,
            "end": snapshot(trainer),
            "optimizer": trainer.optimizers[0].state_dict(),
            "warnings": [str(w.message) for w in caught],
        }
        torch.save(record, os.path.join(args.out, f"{run['name']}_rank{trainer.global_rank}.pt"))


if __name__ == "__main__":
    main()
