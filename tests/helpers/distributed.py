"""Run a function on several real processes on 127.0.0.1 (gloo on CPU by default; NCCL or gloo on GPUs for
``tests/gpu``), with timeouts so a bug fails instead of hanging."""

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


# Where each rank's tensors live: CPU (None), one GPU per rank, or every rank on GPU 0 (one card is enough).
GPU_PER_RANK = "per_rank"
GPU_SHARED = "shared"


def _worker(
    rank: int, world_size: int, port: int, pg_timeout: timedelta, backend: str, gpu: Optional[str], fn: Callable,
    args: tuple, queue: Any
) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        options: dict[str, Any] = {}
        if gpu is not None:
            device = torch.device("cuda", rank if gpu == GPU_PER_RANK else 0)
            torch.cuda.set_device(device)
            if backend == "nccl":  # binds the group to this GPU: eager communicator init, no guessing the device
                options["device_id"] = device
        dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=pg_timeout, **options)
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
    fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, pg_timeout_s: Optional[float] = None,
    backend: str = "gloo", gpu: Optional[str] = None,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the results ordered by rank.

    A rank that raises fails the test with its traceback; a run that does not finish within ``timeout`` seconds is
    killed. ``pg_timeout_s`` is the process group's timeout (default 60 s). ``backend`` is the default group's;
    ``gpu`` puts each rank on its own GPU (``GPU_PER_RANK``, what NCCL needs) or every rank on GPU 0
    (``GPU_SHARED``, for gloo) and starts the processes with spawn, since CUDA does not survive a fork.
    """
    if gpu not in (None, GPU_PER_RANK, GPU_SHARED):
        raise ValueError(f"gpu must be None, {GPU_PER_RANK!r} or {GPU_SHARED!r}, got {gpu!r}.")
    pg_timeout = PG_TIMEOUT if pg_timeout_s is None else timedelta(seconds=pg_timeout_s)
    start_method = "spawn" if gpu is not None else START_METHOD
    ctx = mp.get_context(start_method)
    queue = ctx.SimpleQueue()
    context = mp.start_processes(
        _worker,
        args=(world_size, free_port(), pg_timeout, backend, gpu, fn, args, queue),
        nprocs=world_size,
        join=False,
        start_method=start_method,
    )
    try:
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish within {timeout}s (a hang: an unmatched "
                                   "collective?)")
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
