"""GoSGD in a hand-written PyTorch loop: torch.distributed and ``GossipAverager``, no Lightning.

    torchrun --standalone --nproc-per-node 4 examples/torch_loop.py       # started by torchrun
    python examples/torch_loop.py --nproc 4                                # starts its own processes (spawn)
    python examples/torch_loop.py --nproc 4 --asynchronous                 # no rank waits for another

``lightning_gossip.gossip`` is plain torch.distributed: importing it imports no Lightning. Every rank trains its own
model on its own shard of scikit-learn's digits; after each optimizer step ``gossip.step()`` pushes, with probability
``p``, (weights, half the gossip weight) to a peer and mixes in what arrived. ``gossip.end()`` leaves the exact
consensus on every rank. In asynchronous mode the data is shared out dynamically (``WorkSharingSampler``), so fast
ranks take more batches and every sample is still used once per epoch.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from lightning_gossip.gossip import GossipAverager, GossipOptions
from lightning_gossip.gossip.work_sharing import WorkSharingSampler


def train(args: argparse.Namespace) -> None:
    """One rank's training; the process group is initialised (torchrun's or our own environment)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)  # the model's initial weights (rank 0's are broadcast anyway)
    rank, world_size = dist.get_rank(), dist.get_world_size()

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, torch.tensor(y), test_size=0.2, random_state=0)
    dataset = TensorDataset(x_train, y_train)

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    options = GossipOptions(p=args.p, topology="random", seed=0, asynchronous=args.asynchronous)
    gossip = GossipAverager(model, options)  # broadcasts rank 0's weights; a_i = 1/M
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # momentum stays local to each rank

    if args.asynchronous:
        # chunks of the epoch's seeded permutation, claimed through the process group's store
        sampler = WorkSharingSampler(dataset, batch_size=32, seed=0)
    else:
        # lock-step gossip pairs ranks by step number: every rank must take the same number of steps
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=0, drop_last=True)
    loader = DataLoader(dataset, batch_size=32, sampler=sampler, drop_last=True)

    steps = 0
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        for xb, yb in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            optimizer.step()
            gossip.step()  # maybe push to a peer; mix in what arrived
            steps += 1
        if args.asynchronous:
            gossip.finish()  # quiescence: nothing in flight, the gossip weights sum to 1
        with torch.no_grad(), gossip.consensus_swapped_in() as distance:  # a collective: every rank enters it
            acc = (model(x_test).argmax(1) == y_test).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch}: consensus test accuracy {acc:.3f}, consensus distance {distance:.4f}", flush=True)

    gossip.end()  # (lock-step) step counts compared; every message home; the exact consensus on every rank
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    # one write per line, so the ranks' lines do not interleave
    sys.stdout.write(f"rank {rank}: {steps} steps, {gossip.counters.messages_sent} messages sent, "
                     f"consensus test accuracy {acc:.3f}\n")
    sys.stdout.flush()


def _spawned(local_rank: int, world_size: int, port: int, args: argparse.Namespace) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=local_rank, world_size=world_size, timeout=timedelta(seconds=120))
    try:
        train(args)
    finally:
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=4, help="processes to spawn when not started by torchrun")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--asynchronous", action="store_true")
    args = parser.parse_args()

    if "RANK" in os.environ:  # torchrun (or SLURM via torchrun) set up the environment
        # gloo: this example keeps the model on the CPU (with GPUs: "nccl" and the model on cuda:LOCAL_RANK)
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        try:
            train(args)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:  # a free port for our own rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_spawned, args=(args.nproc, port, args), nprocs=args.nproc, join=True)


if __name__ == "__main__":
    main()
