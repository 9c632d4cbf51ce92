"""Run a function on several real gloo processes on 127.0.0.1, with timeouts so a bug fails instead of hanging."""

from __future__ import annotations

import io
import os
import socket
import time
import traceback
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

PG_TIMEOUT = timedelta(seconds=60)
# fork: the children inherit the parent's imports (torch, Lightning), which saves seconds per test on 2 cores.
# They only ever use gloo on CPU. Set LIGHTNING_GOSSIP_TEST_START=spawn to check the other way.
START_METHOD = os.environ.get("LIGHTNING_GOSSIP_TEST_START", "fork")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue: Any) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=PG_TIMEOUT)
    try:
        # Tensors go back as bytes: torch's shared-memory hand-off dies with the child that made it.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report any failure to the parent instead of dying silently
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        dist.destroy_process_group()


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results ordered by rank."""
    ctx = mp.get_context(START_METHOD)
    queue = ctx.SimpleQueue()
    context = mp.start_processes(
        _worker,
        args=(world_size, free_port(), fn, args, queue),
        nprocs=world_size,
        join=False,
        start_method=START_METHOD,
    )
    try:
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish within {timeout}s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    results: dict[int, Any] = {}
    while not queue.empty():
        rank, status, value = queue.get()
        if status == "error":
            raise AssertionError(f"rank {rank} failed:\n{value}")
        results[rank] = torch.load(io.BytesIO(value), weights_only=False)
    assert sorted(results) == list(range(world_size)), f"missing results from ranks: {sorted(results)}"
    return [results[r] for r in range(world_size)]
