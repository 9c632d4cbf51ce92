"""The GPU tests' launchers: one NCCL rank per GPU, or several gloo ranks sharing GPU 0 (the shared harness in
``tests/helpers/distributed.py`` with a GPU placement; spawned, with timeouts so a hang fails)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from tests.helpers.distributed import GPU_PER_RANK, GPU_SHARED, run_distributed

PG_TIMEOUT = timedelta(seconds=120)


def gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def run_nccl(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` NCCL ranks, rank r bound to GPU r."""
    return run_distributed(fn, world_size, *args, timeout=timeout, pg_timeout_s=PG_TIMEOUT.total_seconds(),
                           backend="nccl", gpu=GPU_PER_RANK)


def run_gloo_on_one_gpu(fn: Callable, world_size: int, *args: Any, timeout: float = 300.0) -> list[Any]:
    """``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks whose tensors all live on GPU 0: the CUDA paths
    that need no NCCL (the asynchronous exchange stages messages through pinned host memory) on a single card."""
    return run_distributed(fn, world_size, *args, timeout=timeout, pg_timeout_s=PG_TIMEOUT.total_seconds(),
                           backend="gloo", gpu=GPU_SHARED)


def mass_and_mean(averager: Any) -> tuple[float, torch.Tensor]:
    """At a quiescent point (after the drain, nothing in flight): sum_i a_i and sum_i a_i x_i over all ranks."""
    averager.finish()
    weight = torch.tensor([averager.weight], dtype=torch.float64, device=averager.state.device)
    weighted = averager.state.flatten().double() * averager.weight
    dist.all_reduce(weight)
    dist.all_reduce(weighted)
    return float(weight.item()), weighted.cpu()
