"""One rank of ``python -m lightning_gossip.bench``: the user's model trained under each strategy in turn.

Started by :mod:`lightning_gossip.bench.launch` the way ``torchrun`` starts a rank (``MASTER_ADDR``, ``RANK``,
``WORLD_SIZE``, ... in the environment), so Lightning's ``TorchElasticEnvironment`` picks it up. The plan
(``--plan plan.json``) lists the runs: one strategy, one repeat each, run one after another in this process (the
Lightning import is paid once). Every run gets its own default process group over its own prefix of one store that
rank 0 hosts at ``MASTER_PORT``, so nothing a run leaves in the store (asynchronous gossip's work-sharing counters,
stop flags) is seen by the next; the group is destroyed after the run.

Measured per run and rank, written to ``OUT/run<i>_rank<r>.json``: the end of every training step on a *training
clock* that stops while Lightning validates (evaluation and the benchmark's own checks never count as training
time), samples trained, the strategy's counters (bytes and messages), each validation's value of the metric with the
training clock and step it was taken at, CPU time, and the bytes the network interface sent (in a namespace).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta
from typing import Any, Optional

# Budgets: the lock-step rows check a time budget every this many steps (rank 0 decides, every rank reads the
# decision from the store: one round trip per this many steps, outside the training clock).
TIME_CHECK_EVERY = 25
# The asynchronous rows count their steps for a step budget in the store every this many steps.
ASYNC_COUNT_EVERY = 8
PROGRESS_EVERY_S = 0.5
STARTED = time.perf_counter()
CALIBRATION_STEPS = 30


class BenchConfigError(RuntimeError):
    """An error that every run would hit (a bad model, datamodule, metric name): the benchmark stops at once."""


def interface_tx_bytes() -> Optional[int]:
    """Bytes sent by this process's network interface; only meaningful inside its own network namespace."""
    ifname = os.environ.get("BENCH_IFNAME")
    if not ifname or ifname == "lo":
        return None
    try:
        with open(f"/sys/class/net/{ifname}/statistics/tx_bytes") as f:
            return int(f.read())
    except OSError:
        return None


def _runqueue_wait() -> Optional[float]:
    """Seconds this thread has spent runnable but waiting for a CPU (Linux schedstat), or None where unknown.

    Subtracted from a step's wall-clock time it leaves the time the training loop ran or was blocked (on a peer,
    a sleep, I/O): what the code did, without what other jobs on a shared machine took from it.
    """
    try:
        with open("/proc/thread-self/schedstat") as f:
            return int(f.read().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def _write_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _lightning(package: str) -> Any:
    import importlib

    return importlib.import_module(package)


def lightning_package(model: Any) -> str:
    """``"lightning.pytorch"`` or ``"pytorch_lightning"``: the package the user's module is written against."""
    names = {f"{c.__module__}.{c.__qualname__}" for c in type(model).__mro__}
    if "pytorch_lightning.core.module.LightningModule" in names:
        return "pytorch_lightning"
    if "lightning.pytorch.core.module.LightningModule" in names:
        return "lightning.pytorch"
    raise BenchConfigError(f"--model built a {type(model).__module__}.{type(model).__qualname__}, which is not a "
                           "LightningModule")


def make_callbacks(pl: Any) -> tuple[type, type]:
    """The recorder and the budget timer, subclassing the callbacks of the user's Lightning package ``pl``."""
    class Recorder(pl.Callback):
        """Times every step on the training clock, reads the metric after every validation, enforces budgets."""

        def __init__(self, run: dict, plan: dict, rank: int, world_size: int, store: Any, progress: Optional[str],
                     sleep_s: float, asynchronous: bool) -> None:
            self.run, self.plan, self.rank, self.world_size, self.store = run, plan, rank, world_size, store
            self.progress_path = progress
            self.sleep_s = sleep_s
            self.asynchronous = asynchronous
            self.budget = plan["budget"]
            self.metric = plan.get("metric")
            self.t0: Optional[float] = None
            self.paused = 0.0
            self._pause_start: Optional[float] = None
            self.ends: list[float] = []
            self.waits: list[float] = []  # runqueue wait at the end of every step (see _runqueue_wait)
            self.wait0: Optional[float] = None
            self.samples = 0
            self.evals: list[list[Any]] = []
            self.final_eval: Optional[list[Any]] = None
            self.train_end: Optional[float] = None
            self.cpu0 = self.cpu1 = 0.0
            self.tx0 = self.tx1 = None
            self.tx_paused = 0
            self._tx_pause_start: Optional[int] = None
            self.paused_wait = 0.0
            self._wait_pause_start: Optional[float] = None
            self.paused_cpu = 0.0
            self._cpu_pause_start = 0.0
            self.counters: dict[str, int] = {}
            self.sizes: dict[str, int] = {}
            self.message_bytes: Optional[int] = None
            self.budget_reached = False
            self._decided_step = -1
            self._last_progress = 0.0

        # -- the training clock: wall-clock time minus what validation and the benchmark's checks took ----------
        def clock(self) -> float:
            assert self.t0 is not None
            return time.perf_counter() - self.t0 - self.paused

        def _pause(self) -> None:
            if self._pause_start is None and self.t0 is not None:
                self._pause_start = time.perf_counter()
                self._tx_pause_start = interface_tx_bytes()
                self._wait_pause_start = _runqueue_wait()
                self._cpu_pause_start = time.process_time()

        def _resume(self) -> None:
            if self._pause_start is not None:
                self.paused += time.perf_counter() - self._pause_start
                self._pause_start = None
                self.paused_cpu += time.process_time() - self._cpu_pause_start
                tx = interface_tx_bytes()
                if tx is not None and self._tx_pause_start is not None:
                    self.tx_paused += tx - self._tx_pause_start
                wait = _runqueue_wait()
                if wait is not None and self._wait_pause_start is not None:
                    self.paused_wait += wait - self._wait_pause_start

        # -- hooks -----------------------------------------------------------------------------------------------
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self.sizes = _sizes(trainer.strategy, pl_module)
            averager = getattr(trainer.strategy, "averager", None)
            if averager is not None:
                self.message_bytes = int(averager.state.message_bytes)
            self.cpu0 = time.process_time()
            self.tx0 = interface_tx_bytes()
            self.wait0 = _runqueue_wait()
            self.t0 = time.perf_counter()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self.sleep_s:
                time.sleep(self.sleep_s)  # the emulated straggler: its compute takes k times as long

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            self.ends.append(self.clock())
            if self.wait0 is not None:
                self.waits.append(_runqueue_wait() - self.wait0 - self.paused_wait)
            self.samples += _batch_size(pl, batch, trainer)
            step = trainer.global_step
            kind, amount = self.budget["kind"], self.budget["value"]
            if kind == "steps" and not self.asynchronous and step >= amount:
                trainer.should_stop = True  # every rank at the same step; Lightning validates once more, then stops
            elif kind == "time" and not self.asynchronous and step and step % TIME_CHECK_EVERY == 0 \
                    and step != self._decided_step:  # once per optimizer step (gradient accumulation repeats it)
                self._decided_step = step
                self._decide_time(trainer, step, float(amount))
            elif kind == "steps" and self.asynchronous and len(self.ends) % ASYNC_COUNT_EVERY == 0:
                self._pause()
                total = self.store.add("bench/async_steps", ASYNC_COUNT_EVERY)
                self._resume()
                if total >= int(amount) * self.world_size:
                    self.budget_reached = True  # the BudgetTimer reports "out of time": every rank stops
            if self.rank == 0 and self.progress_path:
                now = time.perf_counter()
                if now - self._last_progress >= PROGRESS_EVERY_S:
                    self._last_progress = now
                    self._progress(trainer, "train")

        def _decide_time(self, trainer: Any, step: int, seconds: float) -> None:
            """Lock-step time budget: rank 0 decides, every rank reads the same decision at the same step."""
            self._pause()
            key = f"bench/time_stop/{step}"
            if self.rank == 0:
                self.store.set(key, "1" if (self._pause_start - self.t0 - self.paused) >= seconds else "0")
            stop = self.store.get(key) == b"1"
            self._resume()
            if stop:
                trainer.should_stop = True

        def _progress(self, trainer: Any, phase: str) -> None:
            _write_json(self.progress_path, {"run": self.run["index"], "name": self.run["strategy"],
                                             "repeat": self.run["repeat"], "step": trainer.global_step,
                                             "epoch": trainer.current_epoch, "phase": phase,
                                             "clock": round(self.clock(), 2) if self.t0 is not None else 0.0})

        def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
            if trainer.state.fn == "fit":
                self._pause()
                if self.rank == 0 and self.progress_path:
                    self._progress(trainer, "validate")

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            value = self._read_metric(trainer)
            if trainer.state.fn == "fit":
                self._resume()
                if self.t0 is not None:
                    self.evals.append([round(self.clock(), 6), int(trainer.global_step), value])
            else:
                self.final_eval = [self.train_end, int(trainer.global_step), value]

        def _read_metric(self, trainer: Any) -> Optional[float]:
            if not self.metric:
                return None
            metrics = trainer.callback_metrics
            if self.metric not in metrics:
                raise BenchConfigError(
                    f"--metric {self.metric!r}: the model logged no such value during validation; it logged "
                    f"{sorted(metrics) or 'nothing'} (log it in validation_step with self.log({self.metric!r}, ...))")
            return float(metrics[self.metric])

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            # Before the strategy's own end of training (the final consensus), which is not training time.
            self.train_end = self.clock()
            self.cpu1 = time.process_time()
            self.tx1 = interface_tx_bytes()
            counters = getattr(trainer.strategy, "counters", None)
            if counters is not None and hasattr(counters, "as_dict"):
                self.counters = dict(counters.as_dict())

    class BudgetTimer(pl.callbacks.Timer):
        """The asynchronous rows' step or time budget, through Lightning's ``max_time`` path.

        Asynchronous gossip stops every rank when any rank's ``Timer`` runs out (a flag in the store, no per-step
        broadcast) at the end of the data it is sharing out. This timer runs out when the training clock (without
        validation) passes the time budget, or when the ranks together have taken ``steps x world size`` steps.
        """

        def __init__(self, recorder: Recorder, seconds: Optional[float]) -> None:
            super().__init__(duration=timedelta(seconds=seconds) if seconds else timedelta(days=3650),
                             interval="step", verbose=False)
            self.recorder = recorder
            self.seconds = seconds

        def time_elapsed(self, stage: Any = None) -> float:
            if self.recorder.budget_reached:
                return float("inf")
            if self.seconds is not None and self.recorder.t0 is not None:
                return self.recorder.clock()
            return 0.0

    return Recorder, BudgetTimer


def _batch_size(pl: Any, batch: Any, trainer: Any) -> int:
    import importlib

    try:
        return int(importlib.import_module(f"{pl.__name__}.utilities.data").extract_batch_size(batch))
    except Exception:  # a batch whose size Lightning cannot find: count the loader's batch size
        loader = trainer.train_dataloader
        return int(getattr(loader, "batch_size", None) or 1)


def _sizes(strategy: Any, module: Any) -> dict[str, int]:
    """``param_bytes`` (trainable parameters: what DDP all-reduces) and ``gossip_numel`` (what gossip moves)."""
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    averager = getattr(strategy, "averager", None)
    if averager is not None:
        numel = sum(t.numel() for t in averager.state.tensors)
    else:
        numel = sum(p.numel() for p in module.parameters() if p.is_floating_point())
    return {"param_bytes": int(param_bytes), "gossip_numel": int(numel)}


def calibrate(pl: Any, plan: dict, accelerator: str, device_index: int) -> float:
    """This rank's own step time without any communication: a short single-process fit of the user's model (median
    step). The straggler sleeps ``(k - 1)`` times it before every step."""
    from lightning_gossip.bench.spec import instantiate

    pl.seed_everything(int(plan["seed"]), verbose=False)
    model = instantiate(plan["model"])
    datamodule = instantiate(plan["datamodule"]) if plan.get("datamodule") else None
    ends: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, *args: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    import torch

    device = torch.device("cuda", device_index) if accelerator == "gpu" else torch.device("cpu")
    kwargs = {**plan.get("trainer_args", {}), **dict(
        accelerator=accelerator, devices=[device_index] if accelerator == "gpu" else 1,
        strategy=pl.strategies.SingleDeviceStrategy(device=device), max_steps=CALIBRATION_STEPS, max_epochs=-1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0, callbacks=[Clock()])}
    trainer = pl.Trainer(**kwargs)
    trainer.fit(model, datamodule=datamodule)
    diffs = [b - a for a, b in zip(ends[5:-1], ends[6:])] or [b - a for a, b in zip(ends, ends[1:])]
    return statistics.median(diffs) if diffs else 0.0


def run_one(pl: Any, run: dict, plan: dict, rank: int, world_size: int, store: Any, out_dir: str,
            sleep_s: float, phase: list[str]) -> dict:
    from lightning_gossip.bench.spec import instantiate
    from lightning_gossip.bench.strategies import REGISTRY, BuildContext

    entry = REGISTRY[run["strategy"]]
    phase[0] = "build"
    pl.seed_everything(int(plan["seed"]), verbose=False)  # the same initial model and data order in every run
    try:
        model = instantiate(plan["model"])
    except Exception as error:
        raise BenchConfigError(f"--model: building {plan['model']['_target_']} failed: "
                               f"{type(error).__name__}: {error}") from error
    lightning_package(model)  # a LightningModule, or a clear error
    datamodule = None
    if plan.get("datamodule"):
        try:
            datamodule = instantiate(plan["datamodule"])
        except Exception as error:
            raise BenchConfigError(f"--datamodule: building {plan['datamodule']['_target_']} failed: "
                                   f"{type(error).__name__}: {error}") from error
        if not isinstance(datamodule, pl.LightningDataModule):
            raise BenchConfigError(f"--datamodule built a {type(datamodule).__module__}."
                                   f"{type(datamodule).__qualname__}, which is not a {pl.__name__} "
                                   "LightningDataModule")
    ctx = BuildContext(backend=plan["backend"], seed=int(plan["seed"]), world_size=world_size,
                       args=dict(plan.get("strategy_args", {}).get(run["strategy"], {})), package=pl.__name__)
    strategy = entry.build(ctx)
    options = getattr(strategy, "options", None)
    asynchronous = bool(getattr(options, "asynchronous", entry.asynchronous))
    Recorder, BudgetTimer = make_callbacks(pl)
    progress = os.path.join(out_dir, "progress.json")
    recorder = Recorder(run, plan, rank, world_size, store, progress, sleep_s, asynchronous)
    callbacks: list[Any] = [recorder]
    budget = plan["budget"]
    if asynchronous and budget["kind"] in ("steps", "time"):
        callbacks.append(BudgetTimer(recorder, float(budget["value"]) if budget["kind"] == "time" else None))
    validation: dict[str, Any] = {"limit_val_batches": 0}
    if plan.get("metric"):
        validation = {"check_val_every_n_epoch": 1}
        if plan.get("val_every") and not asynchronous:
            validation = {"val_check_interval": int(plan["val_every"]), "check_val_every_n_epoch": None}
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    trainer_kwargs = dict(
        accelerator=plan["accelerator"],
        devices=local_world,
        num_nodes=world_size // local_world,
        strategy=strategy,
        max_epochs=int(budget["value"]) if budget["kind"] == "epochs" else -1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **validation,
    )
    trainer_kwargs.update(plan.get("trainer_args", {}))  # the user's --trainer-arg win (except the ones below)
    trainer_kwargs["callbacks"] = callbacks
    trainer = pl.Trainer(**trainer_kwargs)
    phase[0] = "fit"
    trainer.fit(model, datamodule=datamodule)
    if plan.get("metric") and (not recorder.evals or recorder.evals[-1][1] != trainer.global_step):
        # The last validation was not at the end of training (validation every N steps): validate the final model.
        trainer.validate(model, datamodule=datamodule, verbose=False)
    record = {
        "index": run["index"],
        "strategy": run["strategy"],
        "repeat": run["repeat"],
        "rank": rank,
        "world_size": world_size,
        "asynchronous": asynchronous,
        "steps": int(trainer.global_step),
        "batches": len(recorder.ends),
        "samples": recorder.samples,
        "ends": [round(t, 6) for t in recorder.ends],
        "waits": [round(t, 6) for t in recorder.waits],
        "train_end": recorder.train_end,
        "evals": recorder.evals,
        "final_eval": recorder.final_eval or (recorder.evals[-1] if recorder.evals else None),
        "counters": recorder.counters,
        "sizes": recorder.sizes,
        "message_bytes": recorder.message_bytes,
        "cpu_s": recorder.cpu1 - recorder.cpu0 - recorder.paused_cpu,  # all threads, validation left out
        "tx_bytes": (recorder.tx1 - recorder.tx0 - recorder.tx_paused)
        if recorder.tx0 is not None and recorder.tx1 is not None else None,
        "sleep_s": sleep_s,
        "paused_s": recorder.paused,
    }
    del trainer, model, datamodule, strategy, recorder
    gc.collect()
    return record


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_gossip.bench.worker")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    with open(args.plan) as f:
        plan = json.load(f)
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))

    import torch

    torch.set_num_threads(int(plan.get("threads", 1)))
    import torch.distributed as dist

    import lightning_gossip  # noqa: F401  (registers the strategy names when Lightning is imported)

    pl = _lightning(plan["lightning"])
    phase = ["start"]
    current = None
    try:
        timeout = timedelta(seconds=float(plan["pg_timeout_s"]))
        # One store for the whole plan, hosted by rank 0; every run's process group uses its own prefix of it.
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                              is_master=rank == 0, timeout=timeout)
        sleep_s = 0.0
        straggler = plan.get("straggler")
        if straggler:
            phase[0] = "calibrate"
            compute_s = calibrate(pl, plan, plan["accelerator"], local_rank)
            if rank == int(straggler["rank"]):
                sleep_s = (float(straggler["factor"]) - 1.0) * compute_s
            print(f"[bench worker {rank}] calibrated step {1e3 * compute_s:.2f} ms, sleeping {1e3 * sleep_s:.2f} ms "
                  "before every step", flush=True)
        print(f"[bench worker {rank}] ready after {time.perf_counter() - STARTED:.1f} s", flush=True)
        for run in plan["runs"][int(plan.get("start", 0)):]:
            current = run
            t_run = time.perf_counter()
            run_store = dist.PrefixStore(f"bench/run{run['index']}", store)
            dist.init_process_group(plan["backend"], store=run_store, rank=rank, world_size=world_size,
                                    timeout=timeout)
            record = run_one(pl, run, plan, rank, world_size, run_store, args.out, sleep_s, phase)
            _write_json(os.path.join(args.out, f"run{run['index']:03d}_rank{rank}.json"), record)
            dist.barrier()
            dist.destroy_process_group()
            print(f"[bench worker {rank}] run {run['index']} ({run['strategy']}, repeat {run['repeat']}): "
                  f"{time.perf_counter() - t_run:.1f} s, of which training {record['train_end'] or 0:.1f} s",
                  flush=True)
            current = None
        # Rank 0 hosts the store: it leaves last. Then skip the interpreter's teardown (seconds of freeing modules on
        # a loaded machine); everything this process had to say is written.
        store.add("bench/finished", 1)
        if rank == 0:
            while store.add("bench/finished", 0) < world_size:
                time.sleep(0.01)
    except BaseException as error:  # noqa: BLE001  (every failure is reported to the parent, then re-raised)
        fatal = isinstance(error, BenchConfigError) or phase[0] in ("start", "calibrate")
        report = {"rank": rank, "run": current["index"] if current else None,
                  "strategy": current["strategy"] if current else None, "phase": phase[0], "fatal": fatal,
                  "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        _write_json(os.path.join(args.out, f"error_rank{rank}.json"), report)
        print(report["traceback"], file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Exit now: the other ranks may be waiting in a collective for this one, and the interpreter's teardown
        # (destroying the process group at exit) could wait for them in turn. The parent stops them.
        os._exit(1)
    print(f"[bench worker {rank}] done", flush=True)
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
