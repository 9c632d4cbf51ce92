"""Gossip training in your own Lightning Fabric loop: the loop is unchanged but for ``strategy="gossip"``.

    python examples/fabric_loop.py                          # 3 CPU processes, 5 epochs, checkpoint in gossip.ckpt
    python examples/fabric_loop.py --epochs 8               # run it again: resumes from gossip.ckpt, exactly
    python examples/fabric_loop.py --strategy gossip_async  # no rank waits for another between collectives

Fabric's launcher re-runs this command once per extra process. Each rank trains its own model on its own shard of
scikit-learn's digits; ``optimizer.step()`` runs the optimizer step, then the gossip step. The checkpoint's model
entry is the exact consensus (it loads into a plain model without gossip); every rank writes its own weights,
momentum and gossip state as a part beside it (``gossip.ckpt.parts/``), so a resume with the same number of
processes gives every rank back its own state.
"""

from __future__ import annotations

import argparse
import os

import torch
from lightning.fabric import Fabric
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gossip  # noqa: F401  (registers "gossip" and "gossip_async" in Fabric's strategy registry)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=3, help="processes")
    parser.add_argument("--epochs", type=int, default=5, help="train until this many epochs are done")
    parser.add_argument("--strategy", default="gossip", choices=["gossip", "gossip_async"])
    parser.add_argument("--checkpoint", default="gossip.ckpt")
    args = parser.parse_args()

    torch.set_num_threads(1)
    # or strategy=lightning_gossip.GossipFabricStrategy(p=0.1, topology="ring", ...)
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=args.strategy)
    fabric.launch()
    fabric.seed_everything(0)  # also seeds the gossip schedule, the same on every rank

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)  # no DDP wrapper; rank 0's weights broadcast, a_i = 1/M

    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    loader = DataLoader(data, batch_size=32, shuffle=True)
    if fabric.strategy.options.asynchronous:
        # shared out dynamically: fast ranks take more batches, every sample once per epoch over all ranks
        train = fabric.setup_dataloaders(fabric.strategy.share_work(loader), use_distributed_sampler=False)
    else:
        train = fabric.setup_dataloaders(loader)  # each rank its own shard, all of equal length

    start = 0
    if os.path.exists(args.checkpoint):
        state = {"model": model, "optimizer": optimizer, "epoch": 0}
        fabric.load(args.checkpoint, state)  # every rank: its own weights, momentum and gossip state
        start = state["epoch"]
        fabric.print(f"resumed from {args.checkpoint} after epoch {start}")

    for epoch in range(start, args.epochs):
        for xb, yb in train:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(xb), yb)
            fabric.backward(loss)
            optimizer.step()  # the optimizer step, then the gossip step
        with fabric.strategy.evaluating():  # the exact consensus of all ranks, swapped in for the evaluation
            acc = (model(data.tensors[0]).argmax(1) == data.tensors[1]).float().mean()
        fabric.print(f"epoch {epoch}: consensus accuracy {acc:.3f}, gossip weight {fabric.strategy.gossip_weight:.3f}")
        fabric.save(args.checkpoint, {"model": model, "optimizer": optimizer, "epoch": epoch + 1})

    fabric.strategy.end()  # step counts compared, messages home, the exact consensus on every rank
    counters = fabric.strategy.counters
    fabric.print(f"done: rank 0 sent {counters.messages_sent} messages, received {counters.messages_received}")


if __name__ == "__main__":
    main()
