"""The combination matrix, Fabric side: a user's Fabric loop in {lock-step, asynchronous} with evaluation on the
consensus every epoch, a save (per-rank parts), a second training loop in the same process, and (phase ``resume``)
a load that gives every rank its own state back. Gossip's invariant checks are on (LIGHTNING_GOSSIP_VERIFY=1).

    python fabric_cells.py OUT --mode {lockstep,async} --phase {train,resume} [--package {lightning,lightning_fabric}]

Asynchronous mode shares the training data out (``fabric.strategy.share_work``): fast ranks take more batches, every
sample once per epoch. Each rank writes OUT/<phase>_rank{r}.pt.
"""

from __future__ import annotations

import argparse
import importlib
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

N, BATCH = 96, 4


class Indexed(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(N, 8, generator=g)
        self.y = (self.x.sum(1) > 0).long()

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().clone() for t in model.state_dict().values() if t.is_floating_point()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--mode", choices=["lockstep", "async"], required=True)
    parser.add_argument("--phase", choices=["train", "resume"], required=True)
    parser.add_argument("--package", choices=["lightning", "lightning_fabric"], default="lightning")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.package == "lightning":
        Fabric = importlib.import_module("lightning.fabric").Fabric
        from lightning_gossip import GossipFabricStrategy
    else:
        Fabric = importlib.import_module("lightning_fabric").Fabric
        from lightning_gossip.standalone import GossipFabricStrategy
    asynchronous = args.mode == "async"
    fabric = Fabric(accelerator="cpu", devices=2, strategy=GossipFabricStrategy(p=0.5, asynchronous=asynchronous))
    fabric.launch()
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    strategy = fabric.strategy

    def training_data():
        loader = DataLoader(Indexed(), batch_size=BATCH, shuffle=True)
        if asynchronous:  # fast ranks take more batches; the loader has no length
            return fabric.setup_dataloaders(strategy.share_work(loader), use_distributed_sampler=False)
        return fabric.setup_dataloaders(loader)

    evaluation = DataLoader(Indexed(), batch_size=32)
    record: dict = {"seen": {}, "accuracy": [], "package": type(strategy).__module__}
    path = os.path.join(args.out, "gossip.ckpt")

    def train_epochs(loader, first: int, count: int) -> None:
        for epoch in range(first, first + count):
            model.train()
            for x, y, index in loader:
                optimizer.zero_grad()
                fabric.backward(nn.functional.cross_entropy(model(x), y))
                optimizer.step()
                record["seen"].setdefault(epoch, []).extend(index.tolist())
            model.eval()
            with strategy.evaluating(), torch.no_grad():  # the exact consensus, swapped in and back
                correct = sum(int((model(x).argmax(1) == y).sum()) for x, y, _ in evaluation)
            record["accuracy"].append(correct / N)

    if args.phase == "train":
        train_epochs(training_data(), 0, 2)
        fabric.save(path, {"model": model, "optimizer": optimizer, "epoch": 2})
        record["own_at_save"] = vector(model)
        record["gossip_weight_at_save"] = strategy.gossip_weight
        record["step_at_save"] = strategy.gossip_step
        train_epochs(training_data(), 2, 1)  # a second training loop in the same process, with a new loader
    else:
        state = {"model": model, "optimizer": optimizer, "epoch": 0}
        fabric.load(path, state)
        record["own_after_load"] = vector(model)
        record["gossip_weight_after_load"] = strategy.gossip_weight
        record["step_after_load"] = strategy.gossip_step
        record["loaded_epoch"] = state["epoch"]
        train_epochs(training_data(), 2, 1)
    strategy.end()
    record["params"] = vector(model)
    record["counters"] = strategy.counters.as_dict()
    record["gossip_weight"] = strategy.gossip_weight
    record["verified"] = strategy.averager.verifier.checks if strategy.averager.verifier else 0
    torch.save(record, Path(args.out) / f"{args.phase}_rank{fabric.global_rank}.pt")


if __name__ == "__main__":
    main()
