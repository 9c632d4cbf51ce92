"""Run a function on one NCCL rank per GPU, each process bound to its device, with timeouts so a hang fails."""

from __future__ import annotations

import io
import os
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers.distributed import free_port

PG_TIMEOUT = timedelta(seconds=120)


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    # device_id binds the process group to this GPU (eager NCCL communicator init, no guessing the device)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=PG_TIMEOUT, device_id=device)
    try:
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_nccl(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` NCCL ranks (spawned: CUDA does not survive fork)."""
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    context = mp.start_processes(_worker, args=(world_size, free_port(), fn, args, queue), nprocs=world_size,
                                 join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"NCCL test did not finish within {timeout}s (a hang: an unmatched collective?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results: dict[int, Any] = {}
    while not queue.empty():
        rank, status, value = queue.get()
        if status == "error":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results[rank] = torch.load(io.BytesIO(value), weights_only=False, map_location="cpu")
    assert sorted(results) == list(range(world_size)), f"missing results from ranks: {sorted(results)}"
    return [results[r] for r in range(world_size)]
