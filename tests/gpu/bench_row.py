"""One benchmark row on this machine's GPUs: ``python tests/gpu/bench_row.py [--params N] [--steps S] [--out F]``.

Spawns one NCCL rank per GPU (all of them, up to 8) and times, per step, on a flat model of N float32 parameters:
gossip at p=0.1 and p=1 (blocking), p=0.1 overlapped (staleness 1), p=0.1 with bf16 on the wire, and DDP's cost,
an all-reduce of a gradient of the same size. Prints a markdown row (card, torch, NCCL, world size, ms per step,
bytes sent per step) and writes it as JSON. With one GPU only the all-reduce-free numbers are meaningless; the row
says so. Timings are wall-clock milliseconds after ``--warmup`` steps, with ``torch.cuda.synchronize()``.
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
from tests.gpu.nccl import gpu_count, run_nccl  # noqa: E402

MODES = {
    "gossip_p0.1": {"p": 0.1},
    "gossip_p1": {"p": 1.0},
    "gossip_p0.1_overlap": {"p": 0.1, "overlap": True},
    "gossip_p0.1_bf16": {"p": 0.1, "transfer_dtype": "bfloat16"},
}


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


def _measure(rank: int, world_size: int, params: int, steps: int, warmup: int) -> dict:
    row: dict = {}
    for name, options in MODES.items():
        model = nn.Linear(params // 1000, 1000, bias=False).cuda()
        averager = GossipAverager(model, seed=0, **options)
        row[f"{name}_ms"] = _time(averager.step, steps, warmup)
        averager.end(consensus=False)
        row[f"{name}_bytes_per_step"] = averager.counters.bytes_sent / max(1, averager.counters.steps)
    gradient = torch.randn(params, device="cuda")
    row["allreduce_ms"] = _time(lambda: dist.all_reduce(gradient), steps, warmup)
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=int, default=25_000_000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
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
    if world >= 2:
        results = run_nccl(_measure, world, args.params, args.steps, args.warmup, timeout=1800)
        for key in results[0]:  # the slowest rank sets the pace of lock-step training
            row[key] = max(r[key] for r in results) if key.endswith("_ms") else results[0][key]
    else:
        row["note"] = "one GPU: no peer to gossip with (NCCL needs one rank per GPU); nothing timed"
    keys = [k for k in row if k.endswith("_ms")]
    print("| card | torch | NCCL | ranks | params | " + " | ".join(keys) + " |")
    print("|" + "---|" * (5 + len(keys)))
    print(f"| {row['device']} | {row['torch']} | {row['nccl']} | {world} | {args.params:,} | "
          + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    if args.out:
        Path(args.out).write_text(json.dumps(row, indent=2))


if __name__ == "__main__":
    main()
