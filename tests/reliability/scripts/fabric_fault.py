"""A user's Fabric loop with gossip in which one rank dies or hangs: ``python fabric_fault.py OUT --devices N
(--kill-rank R | --stop-rank R) --fault-step S [--strategy gossip|gossip_async] [--timeout-s T]``.

Fabric's popen launcher re-runs this script per rank. The loop trains many epochs of a small MLP with the collectives
a user's loop has: ``optimizer.step()`` (the gossip step), ``fabric.all_reduce`` of the epoch's loss and
``fabric.barrier()`` at every epoch's end. Rank R sends itself SIGKILL (``--kill-rank``) or SIGSTOP (``--stop-rank``)
right after its S-th optimizer step, noting the time in OUT/fault.txt; every rank notes its pid in OUT/pid_rank{r}.txt
and, if it ends with an exception, its type and message in OUT/error_rank{r}.txt.
"""

import argparse
import os
import signal
import time
import traceback
from datetime import timedelta

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gossip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--devices", type=int, default=3)
    parser.add_argument("--strategy", choices=["gossip", "gossip_async"], default="gossip")
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--stop-rank", type=int, default=None)
    parser.add_argument("--fault-step", type=int, default=20)
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    strategy = lightning_gossip.GossipFabricStrategy(
        p=0.5, asynchronous=args.strategy == "gossip_async", timeout=timedelta(seconds=args.timeout_s)
    )
    fabric = Fabric(accelerator="cpu", devices=args.devices, strategy=strategy)
    fabric.launch()
    rank = fabric.global_rank
    with open(os.path.join(args.out, f"pid_rank{rank}.txt"), "w") as f:
        f.write(str(os.getpid()))
    try:
        fabric.seed_everything(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        model, optimizer = fabric.setup(model, optimizer)
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(240, 8, generator=g), torch.randint(0, 3, (240,), generator=g))
        loader = fabric.setup_dataloaders(DataLoader(data, batch_size=8, shuffle=True))
        steps = 0
        for _ in range(100_000):
            total = torch.zeros(())
            for x, y in loader:
                optimizer.zero_grad()
                loss = nn.functional.cross_entropy(model(x), y)
                fabric.backward(loss)
                optimizer.step()
                total += loss.detach()
                steps += 1
                if steps == args.fault_step and rank in (args.kill_rank, args.stop_rank):
                    how = "killed" if rank == args.kill_rank else "stopped"
                    with open(os.path.join(args.out, "fault.txt"), "w") as f:
                        f.write(f"{time.time()}\nrank {rank} {how} after optimizer step {steps}\n")
                    print(f"FAULT: rank {rank} {how} after optimizer step {steps}", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
                time.sleep(0.005)  # a training step's worth of time: the ranks do not spin on 2 shared cores
            fabric.all_reduce(total, reduce_op="mean")
            fabric.barrier()
    except BaseException as error:
        with open(os.path.join(args.out, f"error_rank{rank}.txt"), "w") as f:
            f.write(f"{time.time()}\n{type(error).__module__}.{type(error).__name__}\n{error}\n")
            f.write(traceback.format_exc())
        raise


if __name__ == "__main__":
    main()
