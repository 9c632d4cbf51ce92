"""One Trainer script for every launcher: torchrun on one or many nodes, SLURM's srun, or plain ``python``.

    bash examples/multinode/torchrun.sh                     # this node, 2 processes (NPROC_PER_NODE)
    NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash examples/multinode/torchrun.sh   # on node0; NODE_RANK=1 on node1
    sbatch examples/multinode/slurm.sbatch                  # SLURM: srun starts one task per process
    python examples/multinode/train.py --devices 2          # no launcher: Lightning starts the processes

Lightning reads the launcher's environment (``TorchElasticEnvironment`` under torchrun, ``SLURMEnvironment`` under
srun) and takes the ranks from it; ``num_nodes`` and ``devices`` must match what the launcher started, so this
script reads them from the same environment. Gossip needs nothing more than DDP would: the gossip schedule is a
function of (seed, step) computed alike on every rank, and the messages are point-to-point over the process group.
"""

from __future__ import annotations

import argparse
import os
import socket

import lightning as L
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gossip


class Classifier(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def nodes_and_devices(default_devices: int) -> tuple[int, int]:
    """(num_nodes, processes per node) as the launcher started them."""
    env = os.environ
    if "LOCAL_WORLD_SIZE" in env and "WORLD_SIZE" in env:  # torchrun
        per_node = int(env["LOCAL_WORLD_SIZE"])
        return int(env["WORLD_SIZE"]) // per_node, per_node
    if "SLURM_NTASKS" in env and "SLURM_NNODES" in env:  # srun
        nodes = int(env["SLURM_NNODES"])
        return nodes, int(env["SLURM_NTASKS"]) // nodes
    return 1, default_devices  # plain `python train.py`: Lightning starts the processes of this node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=2, help="processes per node without a launcher")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--p", type=float, default=0.1)
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    num_nodes, devices = nodes_and_devices(args.devices)
    L.seed_everything(0)
    trainer = L.Trainer(
        accelerator="auto",  # GPUs where there are some (one process per GPU), else CPU
        devices=devices,
        num_nodes=num_nodes,
        strategy=lightning_gossip.GossipStrategy(p=args.p),
        max_epochs=args.epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    x, y = load_digits(return_X_y=True)
    data = TensorDataset(torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y))
    model = Classifier()
    trainer.fit(model, DataLoader(data, batch_size=32, shuffle=True))
    # after fit every rank holds the same exact consensus
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    print(f"rank {trainer.global_rank}/{trainer.world_size} on {socket.gethostname()} "
          f"(node {trainer.node_rank}, local rank {trainer.local_rank}): {trainer.global_step} steps, "
          f"consensus checksum {checksum:.10f}", flush=True)


if __name__ == "__main__":
    main()
