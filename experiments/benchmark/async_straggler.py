"""Straggler suite for asynchronous gossip (issue 10): epochs of real Lightning training with 4 CPU workers, compute
emulated by sleeping (so shared cores do not hide the effect), one rank k times slower or a random rank delayed.

Rows: asynchronous gossip (work-sharing data, no rank waits), lock-step overlapped gossip, DDP, local SGD and the
no-communication floor (lock-step p=0 on equal shards, no per-step broadcast). Every row trains the same number of
epochs over the same data, so throughput is samples per second over the fit, and a row's "kept" figure is its
throughput with the straggler divided by its own throughput without one (the issue's target for asynchronous
gossip: >= 85% with one worker 2x slower; the ideal is (M - 1 + 1/k) / M = 87.5% for M=4, k=2).

    python -m experiments.benchmark.async_straggler --out experiments/results/benchmark/straggler_async
    python -m experiments.benchmark.async_straggler --quick --out /tmp/smoke      # seconds, for the smoke test

Not measured here by the helper that wrote it (a shared, loaded 2-core machine): run it on an idle machine. The
100 Mbit/s rows of the issue need network namespaces (lightning_gossip/bench/netns.py) and are not in this suite.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[2]

CONFIGS: dict[str, dict[str, Any]] = {
    "async_p0.1": {"strategy": "gossip", "p": 0.1, "asynchronous": True},
    "lockstep_p0.1_overlap": {"strategy": "gossip", "p": 0.1, "overlap": True, "sigterm_sync_every": None},
    "ddp": {"strategy": "ddp"},
    "local_sgd_h16": {"strategy": "gossip", "p": 0.0, "average_every": 16, "sigterm_sync_every": None},
    "floor": {"strategy": "gossip", "p": 0.0, "final_consensus": False, "sigterm_sync_every": None},
    # issue 18: the outer-momentum gossip ("gossip_outer" / "gossip_outer_async"'s settings)
    "async_outer_h8": {"strategy": "gossip", "p": 0.0, "asynchronous": True, "outer_every": 8, "outer_lr": 0.3},
    "lockstep_outer_h8": {"strategy": "gossip", "p": 0.0, "outer_every": 8, "outer_lr": 0.3,
                          "sigterm_sync_every": None},
}
SCENARIOS: dict[str, dict[str, Any]] = {
    "none": {},
    "straggler2x": {"factor": 2.0},  # the last rank is the slow one
    "straggler4x": {"factor": 4.0},
    "jitter": {"jitter_factor": 3.0},  # each step, each rank is delayed 3x with probability 1/M
}


# -- one run (a worker script: Lightning's popen launcher re-runs this file per rank) -------------------------------
def worker(args: argparse.Namespace) -> None:
    import lightning as L
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_gossip
    from experiments.benchmark.common import DATA_FULL, DATA_QUICK, MODEL_FULL, MODEL_QUICK, accuracy, make_data
    from experiments.benchmark.common import make_model

    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    model_cfg, data_cfg = (MODEL_QUICK, DATA_QUICK) if args.quick else (MODEL_FULL, DATA_FULL)
    x, y, x_test, y_test = make_data(model_cfg, data_cfg)
    config, scenario = CONFIGS[args.config], SCENARIOS[args.scenario]
    emulate_s = args.emulate_ms / 1e3

    class Bench(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(model_cfg)
            self.steps = 0
            self.rng = random.Random(1000 + int(os.environ.get("LOCAL_RANK", 0)))

        def training_step(self, batch, batch_idx):
            factor = 1.0
            if "factor" in scenario and self.global_rank == self.trainer.world_size - 1:
                factor = scenario["factor"]
            elif "jitter_factor" in scenario and self.rng.random() < 1.0 / self.trainer.world_size:
                factor = scenario["jitter_factor"]
            time.sleep(emulate_s * factor)
            self.steps += 1
            xb, yb = batch
            return nn.functional.cross_entropy(self.net(xb), yb)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

        def on_train_start(self) -> None:
            self.started = time.perf_counter()
            self.eval_seconds = 0.0
            self.curve: list[tuple[float, float]] = []  # (training seconds so far, consensus test accuracy)

        def on_train_epoch_end(self) -> None:
            # The consensus after every epoch (every rank meets at an epoch's end, also asynchronously), timed out
            # of the training seconds: time to a target accuracy, not only throughput.
            t0 = time.perf_counter()
            averager = getattr(self.trainer.strategy, "averager", None)
            looking = averager.consensus_swapped_in() if averager is not None and averager.world_size > 1 \
                else contextlib.nullcontext()
            with looking:
                acc = accuracy(self.net, x_test, y_test)
            self.curve.append((t0 - self.started - self.eval_seconds, acc))
            self.eval_seconds += time.perf_counter() - t0

        def on_train_end(self) -> None:
            self.ended = time.perf_counter()

    options = {k: v for k, v in config.items() if k != "strategy"}
    strategy = lightning_gossip.GossipStrategy(**options) if config["strategy"] == "gossip" else "ddp"
    model = Bench()
    trainer = L.Trainer(
        accelerator="cpu", devices=args.workers, strategy=strategy, max_epochs=args.epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True, drop_last=False)
    trainer.fit(model, loader)
    if trainer.global_rank != 0:
        return
    record = {
        "config": args.config,
        "scenario": args.scenario,
        "workers": args.workers,
        "epochs": args.epochs,
        "samples": args.epochs * len(y),
        "seconds": model.ended - model.started - model.eval_seconds,
        "curve": model.curve,
        "steps_rank0": model.steps,
        "test_accuracy": accuracy(model.net, x_test, y_test),
        "emulate_ms": args.emulate_ms,
    }
    record["samples_per_s"] = record["samples"] / record["seconds"]
    with open(args.record, "w") as f:
        json.dump(record, f)


# -- the suite ------------------------------------------------------------------------------------------------------
def suite(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = args.configs or list(CONFIGS)
    scenarios = args.scenarios or list(SCENARIOS)
    records = []
    for scenario in scenarios:
        for config in configs:
            record_path = out / f"{config}__{scenario}.json"
            cmd = [sys.executable, "-m", "experiments.benchmark.async_straggler", "--worker", "--config", config,
                   "--scenario", scenario, "--record", str(record_path), "--workers", str(args.workers),
                   "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
                   "--emulate-ms", str(args.emulate_ms)] + (["--quick"] if args.quick else [])
            env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
            env.pop("LOCAL_RANK", None)
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.run_timeout)
            if proc.returncode != 0:
                raise RuntimeError(f"{config} / {scenario} failed:\n{proc.stderr[-4000:]}")
            records.append(json.loads(record_path.read_text()))
            print(f"{config:24s} {scenario:12s} {records[-1]['samples_per_s']:9.1f} samples/s", flush=True)
    (out / "results.json").write_text(json.dumps(records, indent=1))
    (out / "README.md").write_text(table(records))


def time_to(record: dict[str, Any], target: float) -> Optional[float]:
    """Training seconds until the consensus first reached ``target`` test accuracy at an epoch's end (None: never)."""
    return next((seconds for seconds, acc in record.get("curve", []) if acc >= target), None)


def table(records: list[dict[str, Any]]) -> str:
    base = {r["config"]: r["samples_per_s"] for r in records if r["scenario"] == "none"}
    ddp = [r for r in records if r["config"] == "ddp" and r["scenario"] == "none"]
    target = ddp[0]["test_accuracy"] - 0.01 if ddp else None
    ddp_time = {r["scenario"]: time_to(r, target) for r in records if r["config"] == "ddp"} if ddp else {}
    lines = [
        f"Target: DDP's final test accuracy without a straggler minus 1 point = {target:.3f}" if target else "",
        "",
        "| config | scenario | samples/s | kept vs. no straggler | test accuracy | seconds | time to target | "
        "vs. DDP's time (same scenario) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        kept = f"{r['samples_per_s'] / base[r['config']]:.0%}" if r["config"] in base else "-"
        reach = time_to(r, target) if target else None
        ratio = f"{reach / ddp_time[r['scenario']]:.2f}x" if reach and ddp_time.get(r["scenario"]) else "-"
        lines.append(
            f"| {r['config']} | {r['scenario']} | {r['samples_per_s']:.1f} | {kept} | {r['test_accuracy']:.3f} | "
            f"{r['seconds']:.1f} | {'-' if reach is None else f'{reach:.1f}'} | {ratio} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="experiments/results/benchmark/straggler_async")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS))
    parser.add_argument("--scenarios", nargs="*", choices=list(SCENARIOS))
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--emulate-ms", type=float, default=40.0)
    parser.add_argument("--quick", action="store_true", help="tiny model and data (a smoke run, not a measurement)")
    parser.add_argument("--run-timeout", type=float, default=1800.0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--scenario", help=argparse.SUPPRESS)
    parser.add_argument("--record", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        suite(args)


if __name__ == "__main__":
    main()
