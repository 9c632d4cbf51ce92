"""A user's own Fabric loop with gossip, unchanged but for the strategy:
``python fabric_loop.py OUT --phase {straight,resume} [--strategy NAME | --p P]
[--package lightning|lightning_fabric]``.

Fabric's popen launcher re-runs this script per rank (3 CPU processes). ``straight`` trains 2 epochs, saves a
checkpoint after epoch 1 with ``fabric.save``, and ends with ``fabric.strategy.consensus_()``; ``resume`` starts
from a fresh model, ``fabric.load``\\ s that checkpoint and trains epoch 2 again. Each rank writes
``OUT/<phase>_rank{r}.pt``. With ``--strategy gossip_async`` the ranks do not wait for each other between the
collectives (``fabric.save``, ``all_gather``, ``consensus_()``).
"""

import argparse
import importlib
import os

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import lightning_gossip  # noqa: F401  (registers "gossip" in Fabric's strategy registry)

N, DIM, CLASSES, BATCH = 120, 8, 3, 4  # 3 ranks: 40 samples, 10 steps per epoch each


class Indexed(Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        self.x = torch.randn(N, DIM, generator=g)
        self.y = torch.randint(0, CLASSES, (N,), generator=g)

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int):
        return self.x[i], self.y[i], i


def model_factory() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, CLASSES))


def vector(model: nn.Module) -> torch.Tensor:
    return torch.cat([t.detach().flatten().clone() for t in model.state_dict().values() if t.is_floating_point()])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--phase", choices=["straight", "resume"], required=True)
    parser.add_argument("--strategy", default=None, help="a registry name; default: GossipFabricStrategy(p=--p)")
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--package", choices=["lightning", "lightning_fabric"], default="lightning")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.package == "lightning":
        Fabric = importlib.import_module("lightning.fabric").Fabric
        from lightning_gossip import GossipFabricStrategy
    else:
        Fabric = importlib.import_module("lightning_fabric").Fabric
        from lightning_gossip.standalone import GossipFabricStrategy
    strategy = args.strategy or GossipFabricStrategy(p=args.p)
    fabric = Fabric(accelerator="cpu", devices=3, strategy=strategy)
    fabric.launch()
    fabric.seed_everything(0)  # seeds the gossip schedule too (7 messages in 20 steps at p=0.1), alike in both phases
    if args.phase == "resume":
        torch.manual_seed(99)  # another initial model, which fabric.load must replace
    model = model_factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(Indexed(), batch_size=BATCH, shuffle=False))
    checkpoint = os.path.join(args.out, "gossip.ckpt")
    record: dict = {"strategy": f"{type(fabric.strategy).__module__}.{type(fabric.strategy).__qualname__}"}

    def epoch(name: str) -> None:
        model.train()
        seen, steps = [], []
        for x, y, index in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            fabric.backward(loss)
            optimizer.step()
            seen += index.tolist()
            steps.append(vector(model))
        record[f"{name}_seen"] = seen
        record[f"{name}_steps"] = torch.stack(steps)

    if args.phase == "straight":
        epoch("epoch1")
        # The save is the first collective after training, so in asynchronous mode messages can be on the wire then.
        own_before_save = vector(model)
        fabric.save(checkpoint, {"model": model, "optimizer": optimizer, "epoch": 1})
        # what was saved as this rank's own: in asynchronous mode the save first mixes in the messages on the wire
        record["own_at_save"] = vector(model)
        record["gossip_step_at_save"] = fabric.strategy.gossip_step
        if not fabric.strategy.options.asynchronous:
            assert torch.equal(record["own_at_save"], own_before_save), "saving must give every rank its weights back"
        with fabric.strategy.consensus_swapped_in():  # nothing moved since the save: the consensus it wrote
            record["consensus_at_save"] = vector(model)
        record["mid_all_ranks"] = fabric.all_gather(vector(model)).cpu()  # every rank's own weights, mid-training
        epoch("epoch2")
        record["distance_removed"] = fabric.strategy.consensus_()
        # after consensus_(), which brings every message home (asynchronous pushes may still be on the wire before)
        record["counters"] = fabric.strategy.counters.as_dict()
        record["after_consensus_all_ranks"] = fabric.all_gather(vector(model)).cpu()
    else:
        state = {"model": model, "optimizer": optimizer, "epoch": 0}
        remainder = fabric.load(checkpoint, state)
        record["loaded_epoch"] = state["epoch"]
        record["remainder_keys"] = sorted(remainder)
        record["own_after_load"] = vector(model)
        record["gossip_step_after_load"] = fabric.strategy.gossip_step
        epoch("epoch2")
    fabric.strategy.end()  # as the docs ask after the loop: messages home, the receivers of gossip_async stopped
    torch.save(record, os.path.join(args.out, f"{args.phase}_rank{fabric.global_rank}.pt"))


if __name__ == "__main__":
    main()
