"""Run a function on several real gloo processes on 127.0.0.1, with timeouts so a bug fails instead of hanging."""

from __future__ import annotations

import io
import os
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port

PG_TIMEOUT = timedelta(seconds=60)
# fork: the children inherit the parent's imports (torch, Lightning), which saves seconds per test on 2 cores.
# They only ever use gloo on CPU. Set LIGHTNING_GOSSIP_TEST_START=spawn to check the other way.
START_METHOD = os.environ.get("LIGHTNING_GOSSIP_TEST_START", "fork")


def free_port() -> int:
    """A free TCP port on this machine (torch's elastic helper: bind to port 0, read it, close)."""
    return get_free_port()


def _worker(
    rank: int, world_size: int, port: int, pg_timeout: timedelta, fn: Callable, args: tuple, queue: Any
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=pg_timeout)
        # Tensors go back as bytes: torch's shared-memory hand-off dies with the child that made it.
        buffer = io.BytesIO()
        torch.save(fn(rank, world_size, *args), buffer)
        queue.put((rank, "ok", buffer.getvalue()))
    except BaseException:  # report any failure to the parent instead of dying silently
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(
    fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, pg_timeout_s: Optional[float] = None
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results ordered by rank.

    A rank that raises fails the test with its traceback; a run that does not finish within ``timeout`` seconds is
    killed. ``pg_timeout_s`` is the process group's timeout (default 60 s).
    """
    pg_timeout = PG_TIMEOUT if pg_timeout_s is None else timedelta(seconds=pg_timeout_s)
    ctx = mp.get_context(START_METHOD)
    queue = ctx.SimpleQueue()
    context = mp.start_processes(
        _worker,
        args=(world_size, free_port(), pg_timeout, fn, args, queue),
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
