"""One process of a 2-node x 2-process gossip fit on this machine (started by tests/reliability/test_multinode.py).

The test starts every process itself, with the environment of the cluster it simulates (torchrun-style NODE_RANK /
LOCAL_RANK / WORLD_SIZE, or SLURM's SLURM_* variables), so Lightning's cluster environment, not its launcher, decides
the ranks. Each process writes OUT/rank{global_rank}.json with what it saw and a checksum of its final model.
"""

import json
import os
import sys
from datetime import timedelta

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gossip


class Net(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def main() -> None:
    out = sys.argv[1]
    torch.set_num_threads(1)
    L.seed_everything(5, verbose=False)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))
    strategy = lightning_gossip.GossipStrategy(p=0.5, timeout=timedelta(seconds=90), monitor=False)
    trainer = L.Trainer(accelerator="cpu", devices=2, num_nodes=2, strategy=strategy, max_epochs=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    model = Net()
    trainer.fit(model, DataLoader(data, batch_size=4))
    env = trainer.strategy.cluster_environment
    record = {
        "global_rank": trainer.global_rank, "local_rank": trainer.local_rank, "node_rank": trainer.node_rank,
        "world_size": trainer.world_size, "environment": type(env).__name__,
        "dist_rank": torch.distributed.get_rank(), "global_step": trainer.global_step,
        "checksum": float(sum(p.double().sum() for p in model.parameters())),
        "messages_sent": strategy.counters.as_dict()["messages_sent"], "pid": os.getpid(),
    }
    with open(os.path.join(out, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main()
