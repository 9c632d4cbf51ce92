"""A Fabric loop that survives lost peers: ``GossipFabricStrategy(asynchronous=True, on_peer_loss="continue")``.

Started by ``python -m lightning_gossip.gossip.launch --nproc 4 fabric_survival.py OUT`` (the launcher hosts the store
and leaves the survivors running). Ranks listed in ``VICTIMS`` SIGKILL themselves (a real signal, by themselves) at
``KILL_WHERE``: ``step`` (before their step ``KILL_AT``), ``save`` (inside ``fabric.save`` of epoch ``KILL_AT``, after the
consistent cut, while writing the part), ``main`` (the writer, while writing the main file of that save) or ``end`` (inside ``fabric.strategy.end()``'s agreement). The others train
``EPOCHS`` epochs on shared work, and after each epoch run Fabric collectives (``all_reduce``, ``all_gather``,
``barrier``, ``broadcast``) and ``fabric.save``; then ``fabric.strategy.end()``. With ``RESUME=<checkpoint>`` every
rank first ``fabric.load``\\ s it. Each survivor writes ``OUT/rank<r>.json``; a victim logs what it trained to
``OUT/victim<r>.jsonl`` before it can die.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from datetime import timedelta

import torch
from lightning.fabric import Fabric
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gossip import GossipFabricStrategy

SAMPLES, BATCH = 320, 8


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    torch.set_num_threads(1)
    out = sys.argv[1]
    victims = [int(v) for v in os.environ.get("VICTIMS", "").split(",") if v]
    kill_at = [int(v) for v in os.environ.get("KILL_AT", "").split(",") if v]
    kill_where = os.environ.get("KILL_WHERE", "step")
    epochs = int(os.environ.get("EPOCHS", "3"))
    strategy = GossipFabricStrategy(p=0.5, asynchronous=True, on_peer_loss="continue", seed=0,
                                    timeout=timedelta(seconds=60))
    fabric = Fabric(accelerator="cpu", devices=int(os.environ["WORLD_SIZE"]), strategy=strategy)
    fabric.launch()
    rank = fabric.global_rank
    victim = rank in victims
    my_kill_at = kill_at[victims.index(rank)] if victim else -1
    if victim and kill_where == "save":
        from lightning_gossip import checkpoint_io

        original_write, saves = checkpoint_io.write_part_with_header, [0]

        def write_part_with_header(*args, **kwargs):
            if saves[0] == my_kill_at:
                _die()
            saves[0] += 1
            return original_write(*args, **kwargs)

        checkpoint_io.write_part_with_header = write_part_with_header
    if victim and kill_where == "main":  # die while writing the main file of save KILL_AT (the writer: lowest rank)
        from lightning_gossip.checkpoint_io import AtomicCheckpointIO

        original_save, mains = AtomicCheckpointIO.save_checkpoint, [0]

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            if str(path).endswith("last.ckpt"):
                if mains[0] == my_kill_at:
                    _die()
                mains[0] += 1
            return original_save(self, checkpoint, path, storage_options=storage_options)

        AtomicCheckpointIO.save_checkpoint = save_checkpoint
    torch.manual_seed(0)
    dataset = TensorDataset(torch.randn(SAMPLES, 4), torch.arange(SAMPLES))
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(fabric.strategy.share_work(DataLoader(dataset, batch_size=BATCH, shuffle=True)),
                                      use_distributed_sampler=False)
    checkpoint = os.path.join(out, "last.ckpt")
    start_epoch = 0
    resume = os.environ.get("RESUME")
    if resume:
        start_epoch = int(fabric.load(resume, {"model": model, "optimizer": optimizer})["epoch"]) + 1
        with open(os.path.join(out, f"resumed_rank{rank}.json"), "w") as f:
            json.dump({"flat": nn.utils.parameters_to_vector(model.parameters()).tolist(),
                       "weight": strategy.gossip_weight, "start_epoch": start_epoch}, f)
    rng = random.Random(rank)
    seen, steps = [], 0
    for epoch in range(start_epoch, start_epoch + epochs):
        ids = []
        for x, index in loader:
            if victim and kill_where == "step" and steps == my_kill_at:
                _die()
            time.sleep(rng.random() * 0.003)
            loss = model(x).pow(2).mean()
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            ids += index.tolist()
            steps += 1
            if victim:  # what the victim trained on, written before it can die
                with open(os.path.join(out, f"victim{rank}.jsonl"), "a") as log:
                    log.write(json.dumps([epoch - start_epoch, index.tolist()]) + "\n")
        # Fabric's collectives at the epoch's end: over the ranks still alive
        trained = fabric.all_reduce(torch.tensor(float(len(ids))), reduce_op="sum")
        gathered = fabric.all_gather(torch.tensor([rank]))
        fabric.barrier()
        token = strategy.broadcast_from_survivor(f"epoch {epoch} from rank {rank}")
        inplace = torch.tensor([1.0])
        fabric.all_reduce(inplace, reduce_op="sum")  # Fabric reduces in place: the input holds the sum
        fabric.save(checkpoint, {"model": model, "optimizer": optimizer, "epoch": epoch})
        sampler = strategy.mode.sampler
        seen.append({"ids": ids, "finished": {int(r): c for r, c in sampler.finished_chunks.items()},
                     "trained_sum": float(trained), "gathered": gathered.flatten().tolist(), "token": token,
                     "inplace": float(inplace)})
    if victim and kill_where == "end":
        from lightning_gossip.gossip import survival

        original_gather = survival.Survivors.gather

        def gather(self, name, value, what):
            _die()
            return original_gather(self, name, value, what)

        survival.Survivors.gather = gather
    strategy.end()
    averager = strategy.averager
    flat = nn.utils.parameters_to_vector(model.parameters()).detach().double()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"seen": seen, "weight": averager.weight, "report": averager.loss_report.as_dict(),
                   "flat": flat.tolist(), "counters": averager.counters.as_dict(), "alive": averager.alive_ranks,
                   "pid": os.getpid()}, f)


if __name__ == "__main__":
    main()
