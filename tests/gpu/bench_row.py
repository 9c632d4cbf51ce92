"""One benchmark row on this machine's GPUs: ``python tests/gpu/bench_row.py [--params N] [--steps S] [--out F]``.

Spawns one NCCL rank per GPU (all of them, up to 8) and times, per step, on a flat model of N float32 parameters:
gossip at p=0.1 and p=1 (blocking), p=0.1 overlapped (staleness 1), p=0.1 with bf16 on the wire, the asynchronous
mode at p=0.1 and p=1 (its messages take a gloo side group from pinned host memory), and DDP's cost, an all-reduce
of a gradient of the same size. With one GPU there is no NCCL peer (NCCL needs one rank per GPU), so only the
asynchronous mode is timed, on 2 gloo ranks sharing the card. The asynchronous rows put ``--compute-ms`` of GPU work
(``torch.cuda._sleep``) in every step, as training would: a step that only gossiped would spin far faster than any
message can cross, and every coin would be skipped. They report ms per step (against ``compute_ms``, the same steps
with no gossip), the bytes actually sent per step and the coins skipped per step (the previous push not yet taken).
Prints a markdown row (card, torch, NCCL, ranks, ms per step) and writes the row as JSON. Timings are wall-clock
milliseconds after ``--warmup`` steps, with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_gossip.gossip import GossipAverager  # noqa: E402
from tests.gpu.nccl import gpu_count, run_gloo_on_one_gpu, run_nccl  # noqa: E402

LOCK_STEP_MODES = {
    "gossip_p0.1": {"p": 0.1},
    "gossip_p1": {"p": 1.0},
    "gossip_p0.1_overlap": {"p": 0.1, "overlap": True},
    "gossip_p0.1_bf16": {"p": 0.1, "transfer_dtype": "bfloat16"},
}
ASYNC_MODES = {
    "async_p0.1": {"p": 0.1, "asynchronous": True},
    "async_p1": {"p": 1.0, "asynchronous": True},
}
SHARED_GPU_RANKS = 2


def _time(fn, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1000.0


def _compute(cycles: int) -> None:
    torch.cuda._sleep(cycles)  # stands in for a training step's kernels: the GPU is busy, the host thread is not
    # A training step ends by reading its loss back (logging, the progress bar): the host waits for the GPU there,
    # with the GIL released. Without it the host would queue steps far ahead, blocked in kernel launches with the GIL
    # held, and each push's device-to-host copy would wait behind the whole queue.
    torch.cuda.synchronize()


def _cycles_for(ms: float) -> int:
    """GPU clock cycles that ``torch.cuda._sleep`` needs to keep the device busy for about ``ms`` milliseconds."""
    probe = 10_000_000
    torch.cuda._sleep(probe)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    torch.cuda._sleep(probe)
    torch.cuda.synchronize()
    return int(probe * ms / ((time.perf_counter() - start) * 1000.0))


def _measure(rank: int, world_size: int, params: int, steps: int, warmup: int, modes: dict,
             compute_ms: float) -> dict:
    row: dict = {}
    cycles = _cycles_for(compute_ms) if any(o.get("asynchronous") for o in modes.values()) else 0
    if cycles:
        row["compute_ms"] = _time(lambda: _compute(cycles), steps, warmup)
    for name, options in modes.items():
        model = nn.Linear(params // 1000, 1000, bias=False).cuda()
        averager = GossipAverager(model, seed=0, **options)
        if options.get("asynchronous"):
            def step(averager=averager) -> None:
                _compute(cycles)
                averager.step()
        else:
            step = averager.step
        row[f"{name}_ms"] = _time(step, steps, warmup)
        averager.end(consensus=False)
        row[f"{name}_bytes_per_step"] = averager.counters.bytes_sent / max(1, averager.counters.steps)
        if options.get("asynchronous"):
            row[f"{name}_skipped_per_step"] = averager.counters.sends_skipped / max(1, averager.counters.steps)
        del averager, model
        torch.cuda.empty_cache()
    if dist.get_backend() == "nccl":
        gradient = torch.randn(params, device="cuda")
        row["allreduce_ms"] = _time(lambda: dist.all_reduce(gradient), steps, warmup)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--compute-ms", type=float, default=20.0, help="GPU work per step in the asynchronous rows")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_row.py needs CUDA GPUs")
    world = min(gpu_count(), 8)
    row = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "nccl": ".".join(map(str, torch.cuda.nccl.version())) if hasattr(torch.cuda, "nccl") else None,
        "world_size": world,
        "params": args.params,
    }
    measure = (args.params, args.steps, args.warmup)
    row["compute_ms_asked"] = args.compute_ms
    if world >= 2:
        results = run_nccl(_measure, world, *measure, {**LOCK_STEP_MODES, **ASYNC_MODES}, args.compute_ms,
                           timeout=1800)
    else:
        world = SHARED_GPU_RANKS
        row["world_size"] = world
        row["note"] = (f"one GPU: {world} gloo ranks share it, only the asynchronous mode is timed (NCCL needs one "
                       "rank per GPU, so there is no lock-step NCCL peer)")
        results = run_gloo_on_one_gpu(_measure, world, *measure, ASYNC_MODES, args.compute_ms, timeout=1800)
    for key in results[0]:  # the slowest rank sets the pace of lock-step training
        row[key] = max(r[key] for r in results) if key.endswith("_ms") else results[0][key]
    keys = [k for k in row if k.endswith("_ms")]
    print("| card | torch | NCCL | ranks | params | " + " | ".join(keys) + " |")
    print("|" + "---|" * (5 + len(keys)))
    print(f"| {row['device']} | {row['torch']} | {row['nccl']} | {world} | {args.params:,} | "
          + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
