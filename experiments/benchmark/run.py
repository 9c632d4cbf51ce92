"""Gossip against DDP, local SGD and single-process training, side by side in one invocation.

    python -m experiments.benchmark                     # full mode: 4 workers, ~1M-param MLP, loopback + namespaces
    python -m experiments.benchmark --quick             # CI: the packaged lightning_gossip.bench on quick.yaml
    python -m experiments.benchmark --quick --compare experiments/results/benchmark/quick/baseline.json

Workers are launched the way torchrun launches them (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK, TORCHELASTIC_RUN_ID in the environment), one process per rank, each running the
Lightning script :mod:`experiments.benchmark.worker`. For a bandwidth-limited network each worker gets its own Linux
network namespace, joined by veth pairs to a bridge and limited with ``tc`` (:mod:`lightning_gossip.bench.netns`);
where that is not possible (not root, no iproute2, not Linux) the harness says why and runs on loopback only.
Results: JSON, a markdown table and PNG plots (:mod:`experiments.benchmark.report`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from typing import Any, Optional

from experiments.benchmark.common import num_params
from experiments.benchmark.configs import (
    SUITES,
    Mode,
    Scenario,
    full_mode,
    overhead_suite,
    scenario_repeats,
    smoke_mode,
    straggler_suite,
    tta_suite,
)
from lightning_gossip.bench import netns
from lightning_gossip.bench.launch import launch as launch_workers
from lightning_gossip.bench.results import dump_json, machine_stamp

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEFAULT_OUT = os.path.join(REPO, "experiments", "results", "benchmark")
# The quick CI benchmark: the packaged `python -m lightning_gossip.bench` on the project's model, as a user runs it.
QUICK_CONFIG = os.path.join(REPO, "experiments", "benchmark", "quick.yaml")


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def log(msg: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def launch(network: Any, world_size: int, plan: dict, out_dir: str, log_dir: str, label: str, timeout: float) -> None:
    """Run the plan on ``world_size`` worker processes, torchrun-style; raise if any fails or time runs out."""
    launch_workers(network, world_size, plan, out_dir, log_dir, label, timeout,
                   worker_module="experiments.benchmark.worker", cwd=REPO, pythonpath=[REPO])


def choose_network(network: str, smoke: bool) -> tuple[bool, str]:
    """Whether to build namespaces: ``auto`` does in full mode when it can, and says why not when it cannot."""
    if network == "loopback":
        return False, "loopback asked for (--network loopback)"
    if smoke and network == "auto":
        return False, "the smoke run is on loopback"
    ok, reason = netns.probe()
    if not ok:
        if network == "netns":
            raise SystemExit(f"--network netns asked for, but: {reason}")
        log(f"NOTE: no network namespaces here ({reason}); the bandwidth-limited scenarios are skipped and "
            "everything runs on plain loopback.")
    return ok, reason


def make_plan(mode: Mode, scenario: Optional[Scenario], configs: list[dict]) -> dict:
    from experiments.benchmark.report import run_dir_name

    runs = []
    repeats = scenario_repeats(mode, scenario)
    batch = (scenario.batch_size if scenario is not None and scenario.batch_size else None) or mode.batch_size
    for rep, cfg in ((rep, cfg) for rep in range(repeats) for cfg in configs):
        run = dict(cfg, name=run_dir_name(cfg["name"], rep))
        run.update(steps=mode.steps * int(cfg.get("steps_factor", 1)), warmup=mode.warmup,
                   snapshot_every=mode.snapshot_every, lr=mode.lr, momentum=mode.momentum, batch_size=batch, seed=0)
        if cfg["kind"] == "single":
            run["batch_size"] = batch * mode.workers
        if scenario is not None and scenario.straggler:
            run["straggler"] = scenario.straggler
        if scenario is not None and scenario.emulate_compute_ms:
            run["emulate_compute_ms"] = scenario.emulate_compute_ms
        runs.append(run)
    return {"model": mode.model, "data": mode.data, "seed": 0, "runs": runs, "pg_timeout_s": 300}


def run_benchmark(args: argparse.Namespace) -> dict:
    # Ctrl-C and SIGTERM both unwind through the try/finally blocks, which stop workers and delete namespaces.
    signal.signal(signal.SIGTERM, _interrupt)
    rates = [float(r) for r in args.rates.split(",") if r]
    netns_ok, reason = choose_network(args.network, args.smoke)
    if args.smoke:
        mode = smoke_mode(args.workers or 2)
    elif args.suite == "overhead":
        mode = overhead_suite(args.workers or 4)
    elif args.suite == "straggler":
        mode = straggler_suite(args.workers or 4, netns_ok, min(rates), args.straggler)
    elif args.suite == "tta":
        mode = tta_suite(args.workers or 4, netns_ok, min(rates))
    else:
        mode = full_mode(args.workers or 4, netns_ok, rates, args.straggler)
    if args.steps:
        mode.steps = args.steps
    if args.only:
        keep = set(args.only.split(","))
        for sc in mode.scenarios:
            sc.configs = [c for c in sc.configs if c["name"] in keep or c["name"] in ("floor", "ddp")]
    if args.scenarios:
        keep_sc = set(args.scenarios.split(","))
        mode.scenarios = [sc for sc in mode.scenarios if sc.name in keep_sc]

    out_dir = args.out or os.path.join(DEFAULT_OUT, mode.name)
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="lgbench-")
    log_dir = os.path.join(work, "logs")
    stamp = machine_stamp()
    log(f"mode {mode.name}: {mode.workers} workers, {num_params(mode.model):,} parameters, {mode.steps} steps; "
        f"machine {stamp['cpu_model']} x{stamp['nproc']}, load {stamp['loadavg_1min_at_start']}; scratch {work}")
    from experiments.benchmark import report

    scenarios_out: list[dict] = []
    rows: list[dict] = []
    try:
        if mode.single:
            t = time.time()
            single = {"name": "single", "kind": "single"}
            launch(netns.Loopback(1), 1, make_plan(mode, None, [single]), os.path.join(work, "single"), log_dir,
                   "single", args.timeout)
            rows += report.summarize_scenario(os.path.join(work, "single"), mode, "single", None, [single])
            log(f"single: {time.time() - t:.0f} s")
            shutil.rmtree(os.path.join(work, "single"), ignore_errors=True)
        for sc in mode.scenarios:
            t = time.time()
            network = netns.Network(mode.workers, sc.rate_mbit) if sc.netns else netns.Loopback(mode.workers)
            sc_dir = os.path.join(work, sc.name)
            with network:
                info = {"name": sc.name, **network.describe(), "straggler": sc.straggler,
                        "emulate_compute_ms": sc.emulate_compute_ms, "repeats": scenario_repeats(mode, sc),
                        "loadavg_1min": round(os.getloadavg()[0], 2)}
                if sc.netns:
                    info["measured_mbit"] = network.measure_mbit()
                    log(f"{sc.name}: namespaces up ({info['subnet']}), one TCP stream measured "
                        f"{info['measured_mbit']} Mbit/s")
                try:
                    launch(network, mode.workers, make_plan(mode, sc, sc.configs), sc_dir, log_dir, sc.name,
                           args.timeout)
                    info["status"] = "ok"
                except (RuntimeError, TimeoutError) as error:
                    info["status"] = f"failed: {error}"
                    log(f"{sc.name}: FAILED: {error}")
                    _print_log_tails(log_dir, sc.name)
            if isinstance(network, netns.Network):
                netns.wait_gone([network.bridge])
            rows += report.summarize_scenario(sc_dir, mode, sc.name, sc, sc.configs)
            shutil.rmtree(sc_dir, ignore_errors=True)
            info["wall_s"] = round(time.time() - t, 1)
            scenarios_out.append(info)
            log(f"{sc.name}: {info['status']} in {info['wall_s']} s")
    finally:
        if args.keep_scratch:
            log(f"scratch kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    results = report.assemble(mode, stamp, scenarios_out, rows, netns_ok, reason)
    json_path = os.path.join(out_dir, "results.json")
    dump_json(results, json_path)
    report.write_markdown(results, os.path.join(out_dir, "results.md"))
    if not args.no_plots:
        report.write_plots(results, out_dir)
    log(f"wrote {json_path}, results.md" + ("" if args.no_plots else " and plots"))
    return results


def _print_log_tails(log_dir: str, label: str, lines: int = 30) -> None:
    for name in sorted(os.listdir(log_dir)):
        if name.startswith(label + "_rank"):
            with open(os.path.join(log_dir, name)) as f:
                tail = f.readlines()[-lines:]
            print(f"--- {name} (last {len(tail)} lines) ---\n" + "".join(tail), file=sys.stderr)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="the quick CI benchmark: `python -m lightning_gossip.bench --config "
                             "experiments/benchmark/quick.yaml` (takes --out, --compare, --no-plots)")
    parser.add_argument("--smoke", action="store_true", help="the smallest run of this harness (what the pytest smoke "
                                                             "runs)")
    parser.add_argument("--suite", choices=SUITES, default="full",
                        help="full: everything at 4 workers; overhead: p=0/overlap cost vs the floor (3 repeats); "
                             "straggler: lock-step vs a straggler with emulated compute; tta: time to target on the "
                             "slow link with gossip given 2x the steps")
    parser.add_argument("--network", choices=("auto", "netns", "loopback"), default="auto",
                        help="auto: namespaces if possible (full mode only), else loopback with a message")
    parser.add_argument("--rates", default="1000,100", help="link rates in Mbit/s for the namespace scenarios")
    parser.add_argument("--workers", type=int, default=None, help="number of workers (default 4, smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="override the number of steps per run")
    parser.add_argument("--straggler", type=float, default=2.0, help="k: the straggler is k times slower")
    parser.add_argument("--only", default=None, help="comma-separated config names to keep (plus floor, ddp)")
    parser.add_argument("--scenarios", default=None, help="comma-separated scenario names to keep")
    parser.add_argument("--out", default=None, help="output directory (default experiments/results/benchmark/MODE)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per scenario launch")
    parser.add_argument("--compare", default=None, metavar="BASELINE.json",
                        help="compare ratios with a baseline results.json; exit 1 on a regression")
    parser.add_argument("--tolerance", type=float, default=2.0,
                        help="--compare: allowed relative growth of a CPU-time ratio (vs the floor) before it is a "
                             "regression (default 2.0: it may triple; only gross slowdowns)")
    parser.add_argument("--wall-tolerance", type=float, default=4.0,
                        help="--compare: the same for wall-clock ratios (default 4.0; millisecond steps on shared "
                             "cores swing 2-4x between runs)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--report-only", default=None, metavar="RESULTS.json",
                        help="no runs: rewrite results.md, ratios, targets and plots from an existing results.json")
    parser.add_argument("--keep-scratch", action="store_true")
    return parser.parse_args(argv)


def rewrite_report(path: str) -> dict:
    """Rewrite results.md, the ratios, the targets and the plots of an existing results.json (no runs)."""
    from experiments.benchmark import report

    with open(path) as f:
        results = json.load(f)
    results["ratios"] = report.ratios(results)
    results["targets"] = report.check_targets(results)
    out_dir = os.path.dirname(os.path.abspath(path))
    dump_json(results, path)
    report.write_markdown(results, os.path.join(out_dir, "results.md"))
    report.write_plots(results, out_dir)
    log(f"rewrote the report of {path}")
    return results


def run_quick(args: argparse.Namespace) -> int:
    """``--quick``: the packaged benchmark on the project's model, through the command a user runs on theirs."""
    from lightning_gossip.bench.cli import main as bench_main

    others = [name for name in ("only", "scenarios", "steps", "report_only", "workers")
              if getattr(args, name) is not None] + (["smoke"] if args.smoke else [])
    if others or args.suite != "full":
        raise SystemExit(f"--quick runs {os.path.relpath(QUICK_CONFIG, REPO)} through `python -m "
                         f"lightning_gossip.bench`; it takes --out, --compare and --no-plots, not "
                         f"{', '.join('--' + o.replace('_', '-') for o in others) or '--suite'}")
    bench_args = ["--config", QUICK_CONFIG, "--out", args.out or os.path.join(DEFAULT_OUT, "quick")]
    if args.compare:
        bench_args += ["--compare", args.compare]
    if args.no_plots:
        bench_args.append("--no-plots")
    log("python -m lightning_gossip.bench " + " ".join(bench_args))
    return bench_main(bench_args)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.quick:
        return run_quick(args)
    results = rewrite_report(args.report_only) if args.report_only else run_benchmark(args)
    if args.compare:
        from experiments.benchmark import report

        with open(args.compare) as f:
            baseline = json.load(f)
        problems, lines = report.compare(results, baseline, args.tolerance, args.wall_tolerance)
        print("\n".join(lines))
        if problems:
            log(f"REGRESSION against {args.compare}: " + "; ".join(problems))
            return 1
        log(f"no regression against {args.compare} (tolerance {args.tolerance:g} CPU, {args.wall_tolerance:g} wall)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
