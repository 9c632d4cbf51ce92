"""``python -m lightning_gossip.bench`` (``lightning-gossip-bench``): will gossip help *my* model, on *my* links?

Trains your LightningModule (with your datamodule) under gossip (lock-step and asynchronous), DDP and Local SGD
side by side in one invocation, on ``--workers`` processes started like ``torchrun`` starts them, and prints one
table: step time and its ratio to DDP, bytes per step, samples/s, time to a target metric, final metric. Optionally
over ``tc``-limited links in network namespaces (``--rate 100``, needs root and iproute2) and with one worker
``k`` times slower (``--straggler k``). ``--compare BASELINE.json`` exits 1 when a ratio regressed.

    lightning-gossip-bench --model my_project.models:Net --datamodule my_project.data:DataModule \\
        --model-arg hidden=128 --workers 4 --epochs 2 --metric val_acc --target 0.9
    lightning-gossip-bench --config bench.yaml --compare baseline/results.json

See docs/benchmark.md for the options, the table's columns and how the comparison decides.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Optional

import yaml

from lightning_gossip.bench import netns
from lightning_gossip.bench import results as report
from lightning_gossip.bench.launch import DEBUG_VARIABLES, WorkerFailed, launch
from lightning_gossip.bench.spec import (
    DATAMODULE_BASES,
    MODULE_BASES,
    SpecError,
    check_target,
    describe,
    locate,
    parse_assignments,
    parse_spec,
    parse_value,
)
from lightning_gossip.bench.strategies import REGISTRY, BuildContext, registered_names, resolve

WORKER_MODULE = "lightning_gossip.bench.worker"
# --trainer-arg keys the benchmark sets itself, and the option to use instead
RESERVED_TRAINER_ARGS = {
    "accelerator": "--accelerator", "devices": "--workers", "num_nodes": "--workers", "strategy": "--strategies",
    "callbacks": "(none: the benchmark adds its own)", "max_epochs": "--epochs", "max_steps": "--steps",
    "max_time": "--time", "val_check_interval": "--val-every", "check_val_every_n_epoch": "--val-every",
}
DEFAULTS: dict[str, Any] = {
    "model": None, "model_args": {}, "datamodule": None, "datamodule_args": {}, "strategies": None,
    "strategy_args": {}, "workers": 2, "accelerator": "cpu", "threads": 1, "epochs": None, "steps": None,
    "time": None, "val_every": None, "metric": None, "mode": "max", "target": None, "warmup": 5, "repeats": 1,
    "seed": 0, "network": "loopback", "rates": None, "straggler": None, "straggler_rank": None,
    "trainer_args": {}, "out": "bench_results", "tolerance": 0.5, "min_change": 0.5, "metric_tolerance": 0.05,
    "bytes_tolerance": 0.25, "timeout": 3600.0, "pg_timeout": 600.0, "no_plots": False, "keep_scratch": False,
}


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked; the message says what to change."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# -- options ------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lightning-gossip-bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter, argument_default=None)
    what = p.add_argument_group("what to train")
    what.add_argument("--config", metavar="FILE.yaml",
                      help="a YAML file holding any of the options below (underscores for dashes: model, "
                           "model_args, strategy_args, ...); options on the command line win")
    what.add_argument("--model", metavar="SPEC",
                      help="your LightningModule: package.module:Class, a YAML file with _target_ and arguments, or "
                           "an inline mapping '{_target_: package.module.Class, hidden: 64}'")
    what.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                      help="an argument of the model (repeatable; VALUE is read as YAML)")
    what.add_argument("--datamodule", metavar="SPEC", help="your LightningDataModule, in the same forms (optional: "
                                                            "without it the model's own *_dataloader methods are used)")
    what.add_argument("--datamodule-arg", action="append", metavar="KEY=VALUE")
    what.add_argument("--trainer-arg", action="append", metavar="KEY=VALUE",
                      help="an argument of every run's Trainer (precision=bf16-mixed, gradient_clip_val=1.0, ...)")
    how = p.add_argument_group("strategies and workers")
    how.add_argument("--strategies", metavar="A,B,...",
                     help="rows to run (default: every available one; see --list-strategies)")
    how.add_argument("--strategy-arg", action="append", metavar="ROW.KEY=VALUE",
                     help="an argument of one row's strategy, e.g. gossip.p=0.5 or local_sgd.average_every=16")
    how.add_argument("--list-strategies", action="store_true", help="list the rows and exit")
    how.add_argument("--workers", type=int, help="worker processes (default 2)")
    how.add_argument("--accelerator", choices=("cpu", "gpu"), help="cpu (gloo; default) or gpu (one GPU per "
                                                                  "worker, NCCL)")
    how.add_argument("--threads", type=int, help="torch threads per worker (default 1)")
    budget = p.add_argument_group("how long (one of them; default --epochs 1)")
    budget.add_argument("--epochs", type=int, help="epochs of your data per run")
    budget.add_argument("--steps", type=int, help="optimizer steps per run (asynchronous rows: the same number of "
                                                  "steps in total over the ranks, so they train as many samples)")
    budget.add_argument("--time", type=float, metavar="SECONDS", help="training time per run (validation excluded)")
    measure = p.add_argument_group("what to measure")
    measure.add_argument("--metric", help="a value your module logs in validation_step (e.g. val_acc, val_loss)")
    measure.add_argument("--mode", choices=("max", "min"), help="whether a larger metric is better (default max)")
    measure.add_argument("--target", help="time to reach it: a number, 'ddp' (DDP's final value) or 'ddp-X' (X "
                                          "worse than DDP's)")
    measure.add_argument("--val-every", type=int, metavar="STEPS",
                         help="lock-step rows: validate every STEPS steps too (default: at the end of every epoch; "
                              "asynchronous rows validate at the end of epochs only)")
    measure.add_argument("--warmup", type=int, help="steps left out of the step time (default 5)")
    measure.add_argument("--repeats", type=int, help="runs per strategy, interleaved; the fastest counts (default 1)")
    measure.add_argument("--seed", type=int, help="seed_everything before every run (default 0)")
    net = p.add_argument_group("network and stragglers")
    net.add_argument("--network", choices=("loopback", "netns"),
                     help="loopback (default) or one network namespace per worker (needs root and iproute2)")
    net.add_argument("--rate", metavar="MBIT[,MBIT...]",
                     help="tc-limit every worker's link to this many Mbit/s (one scenario per rate; implies netns)")
    net.add_argument("--straggler", type=float, metavar="K",
                     help="make one worker K times slower (it sleeps K-1 times its own calibrated step time)")
    net.add_argument("--straggler-rank", type=int, help="which worker (default the last)")
    out = p.add_argument_group("output and comparison")
    out.add_argument("--out", metavar="DIR", help="where results.json/.csv/.md and the plots go (default "
                                                  "./bench_results)")
    out.add_argument("--compare", metavar="BASELINE.json", help="exit 1 if a ratio regressed against this "
                                                                "results.json")
    out.add_argument("--tolerance", type=float,
                     help="--compare: allowed relative growth of a step-time ratio to DDP (default 0.5: up to 1.5x)")
    out.add_argument("--min-change", type=float,
                     help="--compare: a step-time ratio is a regression only if it also grew by more than this "
                          "(default 0.5, in units of the denominator: half of DDP's CPU time per step)")
    out.add_argument("--metric-tolerance", type=float,
                     help="--compare: allowed worsening of a final metric, relative (default 0.05)")
    out.add_argument("--bytes-tolerance", type=float, help="--compare: allowed growth of bytes per step relative to "
                                                          "DDP (default 0.25)")
    out.add_argument("--from-results", metavar="RESULTS.json",
                     help="no runs: print the table of an existing results.json (and --compare it)")
    out.add_argument("--no-plots", action="store_true", default=None)
    out.add_argument("--timeout", type=float, help="seconds per scenario before the workers are stopped")
    out.add_argument("--pg-timeout", type=float, help="process-group timeout in seconds (default 600)")
    out.add_argument("--keep-scratch", action="store_true", default=None, help="keep the workers' logs and records")
    return p


def load_config(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise BenchError(f"--config {path!r}: no such file")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise BenchError(f"--config {path!r}: expected a mapping of options, got {type(data).__name__}")
    unknown = sorted(set(data) - set(DEFAULTS) - {"rate", "compare"})
    if unknown:
        raise BenchError(f"--config {path!r}: unknown option(s) {unknown}; known: {sorted(DEFAULTS)}")
    return data


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BenchError(f"--{name.replace('_', '-')} {value!r}: expected an integer >= {minimum}")
    return value


def _number(name: str, value: Any, minimum: float, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (strict and
                                                                                           value == minimum):
        raise BenchError(f"--{name.replace('_', '-')} {value!r}: expected a number {'>' if strict else '>='} "
                         f"{minimum:g}")
    return float(value)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """Config file, then command line, then defaults -> checked settings (every error names the option)."""
    config = load_config(args.config) if args.config else {}
    s = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}
    if "rate" in config:
        s["rates"] = config["rate"]
    s["compare"] = config.get("compare")
    cli = vars(args)
    for key in DEFAULTS:
        if key in cli and cli[key] is not None and key not in ("model_args", "datamodule_args", "trainer_args",
                                                               "strategy_args"):
            s[key] = cli[key]
    if args.rate is not None:
        s["rates"] = args.rate
    if args.compare is not None:
        s["compare"] = args.compare
    # key=value lists add to (and override) the config file's mappings
    s["model_args"] = {**(s["model_args"] or {}), **parse_assignments(args.model_arg, "--model-arg")}
    s["datamodule_args"] = {**(s["datamodule_args"] or {}), **parse_assignments(args.datamodule_arg,
                                                                                "--datamodule-arg")}
    s["trainer_args"] = {**(s["trainer_args"] or {}), **parse_assignments(args.trainer_arg, "--trainer-arg")}
    strategy_args = {k: dict(v or {}) for k, v in (s["strategy_args"] or {}).items()}
    for item in args.strategy_arg or []:
        left, sep, value = item.partition("=")
        row, dot, key = left.partition(".")
        if not sep or not dot or not row or not key:
            raise BenchError(f"--strategy-arg {item!r}: expected ROW.KEY=VALUE, e.g. gossip.p=0.5")
        strategy_args.setdefault(row.strip(), {})[key.strip()] = parse_value(value)
    s["strategy_args"] = strategy_args
    return check(s)


def check(s: dict[str, Any]) -> dict[str, Any]:
    if s["model"] is None:
        raise BenchError("--model is required: your LightningModule as package.module:Class (or a YAML _target_)")
    s["model"] = parse_spec(s["model"], "--model")
    s["model"].update(s.pop("model_args"))
    if s["datamodule"] is not None:
        s["datamodule"] = parse_spec(s["datamodule"], "--datamodule")
        s["datamodule"].update(s.pop("datamodule_args"))
    elif s.pop("datamodule_args"):
        raise BenchError("--datamodule-arg given without --datamodule")
    s["workers"] = _int("workers", s["workers"], 2)
    s["threads"] = _int("threads", s["threads"], 1)
    s["repeats"] = _int("repeats", s["repeats"], 1)
    s["warmup"] = _int("warmup", s["warmup"], 0)
    s["seed"] = _int("seed", s["seed"], 0)
    budgets = [k for k in ("epochs", "steps", "time") if s[k] is not None]
    if len(budgets) > 1:
        raise BenchError(f"give one of --epochs, --steps, --time, not {' and '.join('--' + b for b in budgets)}")
    kind = budgets[0] if budgets else "epochs"
    value = s[kind] if budgets else 1
    value = _number(kind, value, 0, strict=True) if kind == "time" else _int(kind, value, 1)
    s["budget"] = {"kind": kind, "value": value}
    for k in ("epochs", "steps", "time"):
        s.pop(k)
    if s["val_every"] is not None:
        s["val_every"] = _int("val_every", s["val_every"], 1)
        if not s["metric"]:
            raise BenchError("--val-every needs --metric (what to read after each validation)")
    if s["mode"] not in ("max", "min"):
        raise BenchError(f"--mode {s['mode']!r}: expected max or min")
    if s["target"] is not None:
        if not s["metric"]:
            raise BenchError("--target needs --metric (the value your module logs in validation_step)")
        try:
            report.parse_target(s["target"])
        except ValueError as error:
            raise BenchError(str(error)) from None
    if s["accelerator"] not in ("cpu", "gpu"):
        raise BenchError(f"--accelerator {s['accelerator']!r}: expected cpu or gpu")
    reserved = sorted(set(s["trainer_args"]) & set(RESERVED_TRAINER_ARGS))
    if reserved:
        raise BenchError("--trainer-arg " + ", ".join(f"{k} is set by the benchmark (use {RESERVED_TRAINER_ARGS[k]})"
                                                      for k in reserved))
    # network scenarios
    rates = s["rates"]
    if isinstance(rates, str):
        try:
            rates = [float(r) for r in rates.split(",") if r.strip()]
        except ValueError:
            raise BenchError(f"--rate {s['rates']!r}: expected Mbit/s numbers separated by commas, e.g. 100,1000") \
                from None
    elif isinstance(rates, (int, float)):
        rates = [float(rates)]
    rates = [_number("rate", float(r) if isinstance(r, int) else r, 0, strict=True) for r in rates or []]
    if s["network"] not in ("loopback", "netns"):
        raise BenchError(f"--network {s['network']!r}: expected loopback or netns")
    if rates:
        s["network"] = "netns"
    s["rates"] = rates or None
    straggler = None
    if s["straggler"] is not None:
        factor = _number("straggler", s["straggler"], 1.0)
        rank = s["straggler_rank"] if s["straggler_rank"] is not None else s["workers"] - 1
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < s["workers"]:
            raise BenchError(f"--straggler-rank {rank!r}: expected a rank in [0, {s['workers'] - 1}]")
        straggler = {"rank": rank, "factor": factor}
    elif s["straggler_rank"] is not None:
        raise BenchError("--straggler-rank given without --straggler K")
    s["straggler"] = straggler
    s.pop("straggler_rank")
    s["scenarios"] = scenario_list(s["network"], s["rates"], straggler)
    s["tolerance"] = _number("tolerance", s["tolerance"], 0, strict=True)
    s["min_change"] = _number("min_change", s["min_change"], 0)
    s["metric_tolerance"] = _number("metric_tolerance", s["metric_tolerance"], 0)
    s["bytes_tolerance"] = _number("bytes_tolerance", s["bytes_tolerance"], 0)
    s["timeout"] = _number("timeout", s["timeout"], 0, strict=True)
    s["pg_timeout"] = _number("pg_timeout", s["pg_timeout"], 0, strict=True)
    if isinstance(s["strategies"], str):
        s["strategies"] = [n.strip() for n in s["strategies"].split(",") if n.strip()]
    if s["compare"] is not None and not os.path.isfile(s["compare"]):
        raise BenchError(f"--compare {s['compare']!r}: no such file (a results.json of an earlier run)")
    return s


def scenario_list(network: str, rates: Optional[list[float]], straggler: Optional[dict]) -> list[dict]:
    suffix = f"_straggler{straggler['factor']:g}x" if straggler else ""
    if network == "loopback":
        return [{"name": "loopback" + suffix, "network": "loopback", "rate_mbit": None}]
    if not rates:
        return [{"name": "netns" + suffix, "network": "netns", "rate_mbit": None}]
    return [{"name": f"{r:g}mbit" + suffix, "network": "netns", "rate_mbit": r} for r in rates]


def check_environment(s: dict[str, Any]) -> tuple[list, list[str], str]:
    """Checks that import Lightning and the user's code, before any worker starts: (rows, notes, package)."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does, so the workers (which get cwd on PYTHONPATH) agree
    try:
        check_target(s["model"], "--model", MODULE_BASES, "LightningModule")
        if s["datamodule"] is not None:
            check_target(s["datamodule"], "--datamodule", DATAMODULE_BASES, "LightningDataModule")
    except SpecError as error:
        raise BenchError(str(error)) from None
    cls = locate(s["model"]["_target_"], "--model")
    names = {f"{c.__module__}.{c.__qualname__}" for c in getattr(cls, "__mro__", ())}
    package = "pytorch_lightning" if "pytorch_lightning.core.module.LightningModule" in names else "lightning.pytorch"
    try:
        rows, notes = resolve(s["strategies"], registered_names())
    except ValueError as error:
        raise BenchError(str(error)) from None
    names_run = [r.name for r in rows]
    if "ddp" not in names_run:
        notes.append("no ddp row: the ratios to DDP (and --compare) need it")
        if s["compare"]:
            raise BenchError("--compare needs the ddp row (every ratio is relative to it); add ddp to --strategies")
    stray = sorted(set(s["strategy_args"]) - set(names_run))
    if stray:
        raise BenchError(f"--strategy-arg for {stray}, which this run does not include (rows: {names_run})")
    for entry in rows:  # the strategies check their arguments when built: a bad one fails here, not in a worker
        ctx = BuildContext(backend="nccl" if s["accelerator"] == "gpu" else "gloo", seed=s["seed"],
                           world_size=s["workers"], args=dict(s["strategy_args"].get(entry.name, {})), package=package)
        try:
            entry.build(ctx)
        except (TypeError, ValueError) as error:
            raise BenchError(f"--strategy-arg for {entry.name} ({ctx.args}): {error}") from None
    if s["accelerator"] == "gpu":
        import torch

        if torch.cuda.device_count() < s["workers"]:
            raise BenchError(f"--accelerator gpu --workers {s['workers']}: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s); one per worker is needed")
    if s["network"] == "netns":
        ok, why = netns.probe()
        if not ok:
            raise BenchError(f"--network netns / --rate asked for, but: {why}")
    return rows, notes, package


# -- running --------------------------------------------------------------------------------------------------------
class Progress:
    """A bar over all runs while the workers train (tqdm on a terminal, one line per finished run otherwise)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True,
                                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} runs [{elapsed}<{remaining}] {postfix}")
            except ImportError:
                self.bar = None

    def update(self, scenario: str, scratch: str, runs: list[dict]) -> None:
        finished = {int(os.path.basename(p)[3:6]) for p in glob.glob(os.path.join(scratch, "run*_rank0.json"))}
        done_now = sum(1 for r in runs if r["index"] in finished)
        status = ""
        try:
            with open(os.path.join(scratch, "progress.json")) as f:
                p = json.load(f)
            status = f"{scenario} · {p['name']} (repeat {p['repeat'] + 1}) · epoch {p['epoch']} step {p['step']}" + \
                     (" · validating" if p["phase"] == "validate" else "")
        except (OSError, ValueError, KeyError):
            status = f"{scenario} · starting workers"
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=False)
            self.bar.n = self.done + done_now
            self.bar.refresh()
        else:
            while self.done + done_now > getattr(self, "_printed", 0):
                self._printed = getattr(self, "_printed", 0) + 1
                log(f"{self._printed}/{self.total} runs done ({status})")

    def scenario_done(self, count: int) -> None:
        self.done += count

    def close(self) -> None:
        if self.bar is not None:
            self.bar.n = self.done
            self.bar.close()


def _tail(path: str, lines: int = 25) -> str:
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def run_scenario(scenario: dict, s: dict, rows: list, package: str, scratch: str, progress: Progress) -> tuple:
    """All runs of one scenario: (records by run index, failures by strategy, scenario info)."""
    runs = [{"index": i, "strategy": entry.name, "repeat": rep}
            for i, (rep, entry) in enumerate((rep, e) for rep in range(s["repeats"]) for e in rows)]
    sc_dir = os.path.join(scratch, scenario["name"])
    log_dir = os.path.join(scratch, "logs")
    plan = {
        "model": s["model"], "datamodule": s["datamodule"], "lightning": package,
        "backend": "nccl" if s["accelerator"] == "gpu" else "gloo", "accelerator": s["accelerator"],
        "threads": s["threads"], "seed": s["seed"], "budget": s["budget"], "metric": s["metric"],
        "val_every": s["val_every"], "trainer_args": s["trainer_args"], "strategy_args": s["strategy_args"],
        "straggler": s["straggler"], "pg_timeout_s": s["pg_timeout"],
    }
    network = netns.Network(s["workers"], scenario["rate_mbit"]) if scenario["network"] == "netns" \
        else netns.Loopback(s["workers"])
    failures: dict[str, str] = {}
    info = dict(scenario, straggler=s["straggler"])
    t = time.time()
    attempt = 0
    with network:
        if scenario["network"] == "netns":
            info.update(network.describe())
            info["measured_mbit"] = network.measure_mbit()
        while True:
            done = {int(os.path.basename(p)[3:6]) for p in glob.glob(os.path.join(sc_dir, "run*_rank0.json"))
                    if all(os.path.exists(p.replace("_rank0", f"_rank{r}")) for r in range(s["workers"]))}
            left = [r for r in runs if r["index"] not in done and r["strategy"] not in failures]
            if not left:
                break
            attempt += 1
            try:
                launch(network, s["workers"], {**plan, "runs": left}, sc_dir, log_dir, f"{scenario['name']}_{attempt}",
                       s["timeout"], WORKER_MODULE, cwd=os.getcwd(), pythonpath=[os.getcwd()],
                       poll=lambda: progress.update(scenario["name"], sc_dir, runs))
            except (WorkerFailed, TimeoutError) as error:
                errors = []
                for path in sorted(glob.glob(os.path.join(sc_dir, "error_rank*.json"))):
                    with open(path) as f:
                        errors.append(json.load(f))
                    os.remove(path)
                fatal = [e for e in errors if e.get("fatal")]
                if fatal:
                    e = fatal[0]
                    raise BenchError(f"{e['error']}\n(rank {e['rank']}, while {e['phase']}"
                                     + (f" the {e['strategy']} run" if e.get("strategy") else "") + ")") from None
                failed_run = min((e["run"] for e in errors if e.get("run") is not None), default=None)
                if failed_run is None:
                    try:
                        with open(os.path.join(sc_dir, "progress.json")) as f:
                            failed_run = json.load(f)["run"]
                    except (OSError, ValueError, KeyError):
                        failed_run = left[0]["index"]
                strategy = runs[failed_run]["strategy"]
                first = next((e for e in errors if e.get("run") == failed_run), None)
                why = (first["error"] if first else str(error)).splitlines()[0][:300]
                failures[strategy] = f"failed: {why}"
                log(f"{scenario['name']}: the {strategy} run failed ({why}); the other runs go on")
                if isinstance(error, WorkerFailed):
                    print(f"--- {os.path.basename(error.log)} (last lines) ---\n{_tail(error.log)}", file=sys.stderr)
    if isinstance(network, netns.Network):
        netns.wait_gone([network.bridge])
    records: dict[int, list[dict]] = {}
    for r in runs:
        files = [os.path.join(sc_dir, f"run{r['index']:03d}_rank{k}.json") for k in range(s["workers"])]
        if all(os.path.exists(f) for f in files):
            recs = []
            for f in files:
                with open(f) as fh:
                    recs.append(json.load(fh))
            records[r["index"]] = recs
    info["wall_s"] = round(time.time() - t, 1)
    info["launches"] = attempt
    progress.scenario_done(len(runs))
    return runs, records, failures, info


def summarize(scenario: dict, s: dict, rows: list, runs: list[dict], records: dict, failures: dict) -> list[dict]:
    out = []
    for entry in rows:
        row: dict[str, Any] = {"scenario": scenario["name"], "strategy": entry.name,
                               "description": entry.description}
        candidates = []
        for r in runs:
            if r["strategy"] == entry.name and r["index"] in records:
                summary = report.summarize_run(records[r["index"]], s["warmup"], entry.uncounted_bytes_per_step,
                                               s["strategy_args"].get(entry.name, {}))
                summary["asynchronous"] = records[r["index"]][0]["asynchronous"]
                candidates.append(summary)
        if entry.name in failures:
            row["status"] = failures[entry.name]
        elif not candidates:
            row["status"] = "missing: no run finished"
        else:
            # Noise on a shared machine only ever adds time: the fastest repeat is reported, and each timing
            # (wall-clock, active, CPU) is the smallest over the repeats.
            timed = [c for c in candidates if c["step_ms"] is not None]
            best = min(timed, key=lambda c: c["step_ms"]) if timed else candidates[0]
            row.update(best)
            row["repeats_step_ms"] = [round(c["step_ms"], 4) for c in timed]
            active = [c["active_step_ms"] for c in candidates if c.get("active_step_ms") is not None]
            if len(active) == len(candidates):
                row["active_step_ms"] = min(active)
                row["repeats_active_step_ms"] = [round(a, 4) for a in active]
            row["cpu_ms_per_step"] = min(c["cpu_ms_per_step"] for c in candidates)
            row["repeats_cpu_ms_per_step"] = [round(c["cpu_ms_per_step"], 4) for c in candidates]
            row["status"] = "ok"
        out.append(row)
    return out


def run_benchmark(s: dict, argv: list[str]) -> dict:
    rows, notes, package = check_environment(s)
    stamp = report.machine_stamp()
    debug = [f"{k}={os.environ[k]}" for k in DEBUG_VARIABLES if os.environ.get(k)]
    if debug:
        notes.append(f"the workers run without {', '.join(debug)}: debugging checks would be part of the timings")
    for note in notes:
        log(f"note: {note}")
    total = len(rows) * s["repeats"] * len(s["scenarios"])
    log(f"{len(rows)} strategies ({', '.join(r.name for r in rows)}) x {s['repeats']} repeat(s) x "
        f"{len(s['scenarios'])} scenario(s) on {s['workers']} workers; {s['budget']['value']:g} "
        f"{s['budget']['kind']} per run")
    scratch = tempfile.mkdtemp(prefix="lgbench-")
    progress = Progress(total)
    all_rows, scenarios = [], []
    try:
        for scenario in s["scenarios"]:
            runs, records, failures, info = run_scenario(scenario, s, rows, package, scratch, progress)
            all_rows += summarize(scenario, s, rows, runs, records, failures)
            scenarios.append(info)
    finally:
        progress.close()
        if s["keep_scratch"]:
            log(f"workers' logs and records kept in {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    settings = {k: v for k, v in s.items() if k not in ("out", "compare", "no_plots", "keep_scratch", "timeout")}
    settings["model_description"] = describe(s["model"])
    settings["datamodule_description"] = describe(s["datamodule"])
    settings["strategies"] = [r.name for r in rows]
    settings["lightning"] = package
    report.finish_rows(all_rows, settings)
    return {
        "schema": report.SCHEMA,
        "command": "lightning-gossip-bench " + shlex.join(argv),
        "settings": settings,
        "machine": stamp,
        "scenarios": scenarios,
        "rows": all_rows,
        "ratios": report.ratios(all_rows),
        "notes": notes,
    }


def write_outputs(results: dict, out_dir: str, plots: bool, comparison: Optional[list[str]] = None) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    report.dump_json(results, os.path.join(out_dir, "results.json"))
    report.write_csv(results, os.path.join(out_dir, "results.csv"))
    report.write_markdown(results, os.path.join(out_dir, "results.md"), comparison)
    written = ["results.json", "results.csv", "results.md"]
    if plots:
        files, note = report.write_plots(results, out_dir)
        written += [os.path.basename(f) for f in files]
        if note:
            log(note)
    return written


def list_strategies() -> str:
    try:
        available = registered_names()
    except ImportError:
        available = set()
    lines = []
    for entry in REGISTRY.values():
        here = entry.registry_name is None or entry.registry_name in available
        lines.append(f"{entry.name:20s} {'' if here else '(not registered here) '}{entry.description}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.list_strategies:
        print(list_strategies())
        return 0
    # SIGTERM unwinds through the finally blocks (workers stopped, namespaces deleted); the caller's handler is put
    # back at the end (main may be called in-process)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _main(args, argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(args: argparse.Namespace, argv: list[str]) -> int:
    try:
        if args.from_results:
            with open(args.from_results) as f:
                results = json.load(f)
            if results.get("schema") != report.SCHEMA:
                raise BenchError(f"--from-results {args.from_results!r}: not a {report.SCHEMA} results file")
            s = dict(DEFAULTS, compare=args.compare, **{k: v for k, v in vars(args).items()
                                                         if k in ("tolerance", "min_change", "metric_tolerance",
                                                                  "bytes_tolerance")
                                                         and v is not None})
        else:
            s = settings_from(args)
            results = run_benchmark(s, argv)
        comparison = None
        problems: list[str] = []
        if s.get("compare"):
            with open(s["compare"]) as f:
                baseline = json.load(f)
            if baseline.get("schema") != report.SCHEMA:
                raise BenchError(f"--compare {s['compare']!r}: not a {report.SCHEMA} results file "
                                 f"(schema {baseline.get('schema')!r})")
            problems, comparison = report.compare(results, baseline, s["tolerance"], s["metric_tolerance"],
                                                  s["bytes_tolerance"], s["min_change"])
        if not args.from_results:
            written = write_outputs(results, s["out"], not s["no_plots"], comparison)
            log(f"wrote {', '.join(written)} to {os.path.abspath(s['out'])}")
        print()
        print(report.render_text(report.table(results)))
        failed = [r for r in results["rows"] if r["status"] != "ok"]
        if comparison is not None:
            print(f"\nComparison with {s['compare']} (ratios to DDP measured in each run; tolerance: step time "
                  f"x{1 + s['tolerance']:.2f} and +{s['min_change']:g}, bytes x{1 + s['bytes_tolerance']:.2f}, final "
                  f"metric {100 * s['metric_tolerance']:g}%):")
            print("\n".join(comparison))
            if problems:
                print(f"\nREGRESSION against {s['compare']}:")
                for p in problems:
                    print(f"  - {p}")
                return 1
            print(f"\nno regression against {s['compare']}")
        return 1 if failed else 0
    except (BenchError, SpecError) as error:
        print(f"lightning-gossip-bench: error: {error}", file=sys.stderr)
        return 2
