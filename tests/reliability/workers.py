"""Functions run in spawned worker processes by the reliability tests (importable, so ``spawn`` can find them)."""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
import types
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def import_gossip() -> types.ModuleType:
    """``lightning_gossip.gossip``, checking that importing it did not import Lightning (the algorithm needs only
    torch; importing Lightning in every worker would cost ~10 s of CPU per process on the shared test machine)."""
    had_lightning = "lightning" in sys.modules
    import lightning_gossip.gossip as gossip

    assert had_lightning or "lightning" not in sys.modules, "lightning_gossip.gossip imported Lightning"
    return gossip


def fault_worker(
    rank: int, world_size: int, port: int, mode: str, fault_rank: int, fault_step: int, timeout_s: float, queue: Any,
    asynchronous: bool = False,
) -> None:
    """GossipAverager steps until ``fault_rank`` kills (``mode='kill'``) or stops (``'hang'``) itself; report why
    each other rank stopped: ``(rank, kind, time.time(), text, peers)``. Rank 0 hosts the store (env:// rendezvous).
    ``asynchronous``: the asynchronous exchange (a survivor never waits for the stopped rank in a step)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s))
    gossip_module = import_gossip()
    GossipAverager, GossipPeerError = gossip_module.GossipAverager, gossip_module.GossipPeerError

    torch.manual_seed(rank)
    model = nn.Linear(8, 8)
    gossip = GossipAverager(model, p=0.5, topology="random", seed=3, asynchronous=asynchronous)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        for step in range(100_000 if not asynchronous else 10_000_000):
            if asynchronous:
                time.sleep(0.002)  # a training step's worth of time: the ranks do not spin on 2 shared cores
            if rank == fault_rank and step == fault_step:
                queue.put((rank, "fault", time.time(), mode, []))
                os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
            opt.zero_grad()
            model(torch.randn(4, 8)).pow(2).mean().backward()
            opt.step()
            gossip.step()
        queue.put((rank, "finished", time.time(), "", []))
    except GossipPeerError as error:
        queue.put((rank, "GossipPeerError", time.time(), str(error), error.peers))
    except BaseException:  # noqa: BLE001 - anything else is a test failure, reported with its traceback
        queue.put((rank, "other", time.time(), traceback.format_exc(), []))


