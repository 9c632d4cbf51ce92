"""A Fabric loop that keeps training when workers die: asynchronous gossip with ``on_peer_loss="continue"``.

    python -m lightning_gossip.gossip.launch --nproc 4 examples/fabric_survival.py
    python -m lightning_gossip.gossip.launch --nproc 4 examples/fabric_survival.py --kill-rank 2 --kill-step 30

The survival launcher starts 4 workers, hosts the process group's store and leaves the others running when one dies
(torchrun and Fabric's own launcher stop every worker). ``--kill-rank`` makes that rank SIGKILL itself before its step
``--kill-step``, to see it happen: the survivors drop it, re-share the data it had not finished, and train the
configured epochs; every epoch ends with a Fabric all_reduce over the ranks still alive and a checkpoint
(``survival.ckpt``: after a loss, the survivors' consensus with the loss report). At the end every survivor holds the
survivors' exact consensus and prints what was lost.
"""

from __future__ import annotations

import argparse
import os
import signal

import torch
from lightning.fabric import Fabric
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gossip import GossipFabricStrategy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill-rank", type=int, default=None, help="this rank SIGKILLs itself (a demonstration)")
    parser.add_argument("--kill-step", type=int, default=30, help="... before this step (about 22 per epoch)")
    parser.add_argument("--checkpoint", default="survival.ckpt")
    args = parser.parse_args()

    torch.set_num_threads(1)
    strategy = GossipFabricStrategy(p=0.5, asynchronous=True, on_peer_loss="continue")
    fabric = Fabric(accelerator="cpu", devices=int(os.environ.get("WORLD_SIZE", 4)), strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0)

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    train, test = TensorDataset(x[:1437], y[:1437]), (x[1437:], y[1437:])
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    # shared work: fast ranks take more batches, a lost rank's unfinished ones go to the survivors
    loader = fabric.setup_dataloaders(strategy.share_work(DataLoader(train, batch_size=16, shuffle=True)),
                                      use_distributed_sampler=False)

    steps = 0
    for epoch in range(args.epochs):
        samples = 0
        for xb, yb in loader:
            if fabric.global_rank == args.kill_rank and steps == args.kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            loss = nn.functional.cross_entropy(model(xb), yb)
            fabric.backward(loss)
            optimizer.step()  # the optimizer step, then the gossip step
            optimizer.zero_grad()
            steps += 1
            samples += len(xb)
        trained = fabric.all_reduce(torch.tensor(float(samples)), reduce_op="sum")  # over the ranks still alive
        fabric.save(args.checkpoint, {"model": model, "optimizer": optimizer, "epoch": epoch})
        fabric.print(f"epoch {epoch}: {int(trained)} samples trained by ranks {strategy.averager.alive_ranks}")

    strategy.end()  # the survivors' exact consensus on every survivor
    with torch.no_grad():
        accuracy = float((model(test[0]).argmax(1) == test[1]).float().mean())
    report = strategy.averager.loss_report
    print(f"rank {fabric.global_rank}: consensus test accuracy {accuracy:.3f}; {report.summary()}; "
          f"survivors' weights sum to {1.0 - report.weight_lost:.6f}", flush=True)


if __name__ == "__main__":
    main()
