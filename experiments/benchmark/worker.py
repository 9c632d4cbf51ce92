"""One benchmark worker: a small Lightning training script, launched once per rank the way torchrun launches it.

    MASTER_ADDR=... MASTER_PORT=... RANK=r WORLD_SIZE=M LOCAL_RANK=... LOCAL_WORLD_SIZE=... GROUP_RANK=... \\
    TORCHELASTIC_RUN_ID=... python -m experiments.benchmark.worker --plan plan.json --out DIR

Lightning's ``TorchElasticEnvironment`` picks the ranks up from the environment. Without ``RANK`` in the environment
the worker is a plain single process (the "single" rows). A plan holds several runs (configurations); they run one
after another in the same processes and the same process group, separated by barriers, so the ~7 s Lightning import
is paid once per scenario instead of once per configuration. Each run is a fresh model, optimizer and ``Trainer``.

For every run, every rank writes ``DIR/<run>/rank<r>.pt``: per-step end times, the strategy's counters (whole run and
the timed window after warm-up), the bytes its network interface sent (inside a network namespace, where the
interface is its own), and snapshots of its weights and gossip weight every few steps, from which the harness
evaluates the consensus model's accuracy against time.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

torch.set_num_threads(1)

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy  # noqa: E402

from experiments.benchmark.common import make_data, make_model  # noqa: E402
from lightning_gossip import GossipStrategy  # noqa: E402
from lightning_gossip.bench.worker import interface_tx_bytes  # noqa: E402


_COLLECTIVES = (
    "broadcast", "all_reduce", "barrier", "all_gather", "all_gather_object", "gather", "gather_object", "scatter",
    "reduce", "reduce_scatter", "all_to_all", "broadcast_object_list",
)


class CollectiveCounter:
    """Counts the Python-level torch.distributed collectives called while ``active`` (deterministic, unlike timings).

    Gossip should need none per step; Lightning's per-step SIGTERM broadcast is one. DDP's gradient all-reduce runs
    in C++ (the reducer) and is not seen here.
    """

    def __init__(self) -> None:
        self.count = 0
        self.active = False
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is not None:
                setattr(dist, name, self._wrap(original))

    def _wrap(self, fn):
        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active:
                self.count += 1
            return fn(*args, **kwargs)

        return counted


COLLECTIVES = CollectiveCounter()


class BenchModule(L.LightningModule):
    def __init__(self, model_cfg: dict, lr: float, momentum: float) -> None:
        super().__init__()
        self.net = make_model(model_cfg)
        self.lr = lr
        self.momentum = momentum

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def _counters(trainer: L.Trainer) -> dict[str, int]:
    strategy = trainer.strategy
    if isinstance(strategy, GossipStrategy):
        return strategy.counters.as_dict()
    return {}


class Recorder(Callback):
    """Times every step, snapshots weights, and makes one rank a straggler."""

    def __init__(self, run: dict, batch_size: int, in_dim: int) -> None:
        self.run = run
        self.warmup = int(run["warmup"])
        self.snapshot_every = int(run["snapshot_every"])
        self.batch_size = batch_size
        self.in_dim = in_dim
        self.step_start: list[float] = []
        self.step_end: list[float] = []
        self.snapshots: list[dict[str, Any]] = []
        self.window_counters: dict[str, int] = {}
        self.window_tx: Optional[int] = None
        self.tx_start: Optional[int] = None
        self.sleep_s = 0.0
        self.compute_s: Optional[float] = None
        self.last_counters: dict[str, int] = {}
        self.emulate_s = float(run.get("emulate_compute_ms") or 0.0) / 1e3
        self.gossip_step_s: list[float] = []
        self.cpu_end: list[float] = []
        self.collectives: Optional[int] = None
        self.broadcast_s: list[float] = []
        self.tx_last: Optional[int] = None

    def _weight(self, trainer: L.Trainer) -> float:
        return float(getattr(trainer.strategy, "gossip_weight", 1.0))

    def _snapshot(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int) -> None:
        flat = torch.nn.utils.parameters_to_vector(pl_module.net.parameters()).detach().clone()
        self.snapshots.append({"step": step, "t": time.perf_counter(), "weight": self._weight(trainer), "flat": flat})

    def _calibrate(self, pl_module: L.LightningModule) -> float:
        """Median time of a forward+backward+SGD step on a private copy of the model (no communication hooks)."""
        net = copy.deepcopy(pl_module.net)
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        x = torch.randn(self.batch_size, self.in_dim)
        y = torch.zeros(self.batch_size, dtype=torch.long)
        times = []
        for i in range(8):
            t = time.perf_counter()
            opt.zero_grad()
            nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
            if i >= 3:
                times.append(time.perf_counter() - t)
        return statistics.median(times)

    def on_train_start(self, trainer, pl_module) -> None:
        if self.run.get("sigterm_sync", True) is False:
            disable_sigterm_broadcast(trainer)
        self._time_calls(trainer)
        straggler = self.run.get("straggler")
        # The process's own rank: a `floor` run's Trainer is single-device, so trainer.global_rank is 0 everywhere.
        rank = int(os.environ.get("RANK", 0))
        if straggler and self.emulate_s:
            # Emulated compute: the straggler's step takes `factor` times the emulated time.
            if rank == int(straggler["rank"]):
                self.sleep_s = (float(straggler["factor"]) - 1.0) * self.emulate_s
        elif straggler:
            # Every rank calibrates (so the CPU contention is the same for all); only the straggler sleeps.
            self.compute_s = self._calibrate(pl_module)
            if rank == int(straggler["rank"]):
                self.sleep_s = (float(straggler["factor"]) - 1.0) * self.compute_s
        self.tx_start = interface_tx_bytes()
        self._snapshot(trainer, pl_module, 0)

    def _time_calls(self, trainer: L.Trainer) -> None:
        """Time, in-process, the gossip step and Lightning's per-step broadcast: attribution robust to CPU noise."""
        averager = getattr(trainer.strategy, "averager", None)
        if averager is not None:
            gossip_step = averager.step

            def timed_gossip_step() -> None:
                t = time.perf_counter()
                gossip_step()
                self.gossip_step_s.append(time.perf_counter() - t)

            averager.step = timed_gossip_step  # an instance attribute shadows the method
        loop = trainer.fit_loop.epoch_loop
        broadcast = getattr(loop, "_broadcast_sigterm_tensor", None)
        if broadcast is not None and trainer.world_size > 1 and self.run.get("sigterm_sync", True):

            def timed_broadcast() -> None:
                t = time.perf_counter()
                broadcast()
                self.broadcast_s.append(time.perf_counter() - t)

            loop._broadcast_sigterm_tensor = timed_broadcast

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.sleep_s + self.emulate_s:
            time.sleep(self.sleep_s + self.emulate_s)
        self.step_start.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_end.append(time.perf_counter())
        self.cpu_end.append(time.process_time())  # CPU time of this process (all its threads)
        step = trainer.global_step
        if step == self.warmup:
            self.window_counters = _counters(trainer)
            self.window_tx = interface_tx_bytes()
            COLLECTIVES.count, COLLECTIVES.active = 0, True
        if step == int(self.run["steps"]):
            # The end of the timed window: before the final consensus that ``fit`` runs in on_train_end.
            self.last_counters = _counters(trainer)
            self.tx_last = interface_tx_bytes()
            COLLECTIVES.active = False
            self.collectives = COLLECTIVES.count
        if step % self.snapshot_every == 0 or step == int(self.run["steps"]):
            self._snapshot(trainer, pl_module, step)


def disable_sigterm_broadcast(trainer: L.Trainer) -> bool:
    """Switch off the broadcast of a SIGTERM flag from rank 0 that Lightning runs before EVERY training step.

    Lightning >= 2.5 (``_TrainingEpochLoop._broadcast_sigterm_tensor``) makes every rank wait for rank 0 at every step
    when the world size is above 1: a global barrier per step, which gossip exists to avoid (and over a slow link the
    tiny broadcast queues behind a gossip message on the same connection). The benchmark's ``*_nosync`` rows measure
    gossip without it, as a fix in GossipStrategy would give; returns whether there was anything to switch off.
    """
    loop = trainer.fit_loop.epoch_loop
    if not hasattr(loop, "_broadcast_sigterm_tensor"):
        return False
    loop._broadcast_sigterm_tensor = lambda: None
    return True


def build_strategy(run: dict, world_size: int):
    kind = run["kind"]
    if kind in ("single", "floor"):
        return SingleDeviceStrategy(device=torch.device("cpu"))
    if kind == "ddp":
        return DDPStrategy(process_group_backend="gloo")
    if kind == "gossip":
        options = dict(
            p=float(run["p"]),
            topology=run.get("topology", "random"),
            seed=int(run.get("seed", 0)),
            overlap=bool(run.get("overlap", False)),
            staleness=run.get("staleness"),
            average_every=run.get("average_every"),
            outer_every=run.get("outer_every"),  # the outer-momentum rows (issue 18)
            outer_lr=float(run.get("outer_lr", 0.7)),
            outer_momentum=float(run.get("outer_momentum", 0.9)),
            transfer_dtype=run.get("transfer_dtype"),
            monitor=False,  # no per-step logging and no per-epoch consensus-distance all-reduce in a benchmark
            final_consensus=True,
            process_group_backend="gloo",
            # the `_nosync` rows: the library's own switch (the stock rows keep its default, every 50 steps)
            sigterm_sync_every=None if run.get("sigterm_sync", True) is False else 50,
        )
        if run.get("per_tensor"):
            from experiments.benchmark.variants import PerTensorGossipStrategy

            return PerTensorGossipStrategy(**options)
        return GossipStrategy(**options)
    raise ValueError(f"unknown run kind {kind!r}")


def run_one(run: dict, plan: dict, rank: int, world_size: int, out_dir: str) -> None:
    t_begin = time.perf_counter()
    model_cfg, data_cfg = plan["model"], plan["data"]
    L.seed_everything(int(plan.get("seed", 0)), verbose=False)
    x, y, _, _ = make_data(model_cfg, data_cfg)
    if run["kind"] != "single":  # every worker trains on its own shard, of equal length on every rank
        x, y = x[rank::world_size], y[rank::world_size]
    batch_size = int(run["batch_size"])
    dataset = TensorDataset(x, y)
    sampler = BatchSampler(
        RandomSampler(dataset, generator=torch.Generator().manual_seed(1000 + rank)), batch_size, drop_last=True
    )
    # batch_size=None + a batch sampler: one fancy-index per batch instead of batch_size __getitem__ calls.
    loader = DataLoader(dataset, sampler=sampler, batch_size=None)
    distributed = run["kind"] in ("ddp", "gossip")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    recorder = Recorder(run, batch_size, model_cfg["in_dim"])
    trainer = L.Trainer(
        accelerator="cpu",
        devices=local_world if distributed else 1,
        num_nodes=world_size // local_world if distributed else 1,
        strategy=build_strategy(run, world_size),
        max_steps=int(run["steps"]),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[recorder],
    )
    model = BenchModule(model_cfg, float(run["lr"]), float(run.get("momentum", 0.9)))
    if world_size > 1 and dist.is_initialized():
        dist.barrier()
    trainer.fit(model, loader)
    t_end = time.perf_counter()
    counters = _counters(trainer)
    tx_end = interface_tx_bytes()
    strategy = trainer.strategy
    averager = getattr(strategy, "averager", None)
    weight = float(getattr(strategy, "gossip_weight", 1.0)) if isinstance(strategy, GossipStrategy) else 1.0
    record = {
        "name": run["name"],
        "rank": rank,
        "world_size": world_size,
        "kind": run["kind"],
        "steps": int(run["steps"]),
        "batch_size": batch_size,
        "step_start": recorder.step_start,
        "step_end": recorder.step_end,
        "cpu_end": recorder.cpu_end,
        "collectives": recorder.collectives,
        "fit_end": t_end,
        "counters": recorder.last_counters or counters,
        "window_counters": recorder.window_counters,
        "message_bytes": int(averager.state.message_bytes) if averager is not None else 0,
        "model_bytes": int(sum(p.numel() * p.element_size() for p in model.net.parameters())),
        "num_tensors": len(list(model.net.parameters())),
        "tx_start": recorder.tx_start,
        "tx_window": recorder.window_tx,
        "tx_last": recorder.tx_last,
        "tx_end": tx_end,
        "compute_s": recorder.compute_s,
        "gossip_step_s": recorder.gossip_step_s,
        "broadcast_s": recorder.broadcast_s,
        "sleep_s": recorder.sleep_s,
        "snapshots": recorder.snapshots,
        "final": {
            "t": t_end,
            "weight": weight,
            "flat": torch.nn.utils.parameters_to_vector(model.net.parameters()).detach().clone(),
        },
    }
    record["overhead_s"] = {"setup": recorder.step_start[0] - t_begin, "after_fit": t_end - recorder.step_end[-1]}
    path = os.path.join(out_dir, run["name"])
    os.makedirs(path, exist_ok=True)
    torch.save(record, os.path.join(path, f"rank{rank}.pt"))
    record["overhead_s"]["save"] = time.perf_counter() - t_end
    print(f"[worker rank {rank}] {run['name']}: " + ", ".join(f"{k} {v:.2f} s" for k, v in record["overhead_s"].items())
          + f", train {recorder.step_end[-1] - recorder.step_start[0]:.2f} s", flush=True)
    del trainer, model, recorder, loader


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.plan) as f:
        plan = json.load(f)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size > 1:
        # The default process group is made here, once, from the torchrun-style environment; Lightning finds it
        # initialised and reuses it for every run. The timeout turns a lost peer into an error, not a hang.
        dist.init_process_group("gloo", timeout=timedelta(seconds=float(plan.get("pg_timeout_s", 300))))
    status = 0
    for run in plan["runs"]:
        try:
            run_one(run, plan, rank, world_size, args.out)
        except BaseException:
            print(f"[worker rank {rank}] run {run['name']} failed:\n{traceback.format_exc()}", file=sys.stderr)
            status = 1
            break
    if world_size > 1 and dist.is_initialized() and status == 0:
        dist.barrier()
        dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
