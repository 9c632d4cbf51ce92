"""The MNIST-1D experiment grid of issue 13, run piecewise and resumably: one JSON per run, a run whose JSON exists
is skipped, so an interrupted sweep continues where it stopped.

    python -m experiments.mnist1d.grid equivalence --workers 4,8 --seeds 1,2,3
    python -m experiments.mnist1d.grid exploration --workers 8 --seeds 1,2,3
    python -m experiments.mnist1d.grid topology --workers 16 --seeds 1,2,3
    python -m experiments.mnist1d.grid peers --workers 4 --seeds 1,2,3
    python -m experiments.mnist1d.grid peers --workers 4 --seeds 1 --list      # print the runs, run nothing
    python -m experiments.mnist1d.report                                        # tables and plots from the JSONs

Sweeps (every run: MNIST-1D 20 000 samples, the paper's MLP 40-100-100-10, SGD lr 0.05 momentum 0.9, per-worker
batch 32, ``--steps`` optimizer steps per worker, one thread per worker):

- ``equivalence`` (claim 1): gossip p in {0, 0.01, 0.1, 0.5, 1} with M workers x batch 32, DDP M x 32, and one
  worker with batch M*32 (same learning rate: the consensus of M workers stepping by lr on b samples moves, in
  expectation, like one worker stepping by lr on M*b), IID shards.
- ``exploration`` (claim 2): the same gossip p and DDP on label-skewed shards (Dirichlet alpha 0.3 per class);
  the IID runs are those of ``equivalence``.
- ``topology``: random peer, ring and exponential graph at p = 0.05 (``--p`` for others), IID and label-skewed.
- ``asynchronous``: the asynchronous mode (``gossip_async``) at p in {0.1, 0.5, 1}, IID; the lock-step runs at the
  same p are those of ``equivalence``.
- ``peers``: the independent libraries on the same data/model/steps/workers: torch ``PeriodicModelAverager``
  (Local SGD), torchft ``LocalSGD`` and ``DiLoCo`` (every ``--period`` steps), plus the project's own Lightning path
  (``python -m lightning_gossip.train``) for gossip p=0.1 and Lightning's DDP (``strategy=ddp``), and hand-loop
  gossip at the p that sends the same bytes as Local SGD (p = 2 (M-1) / (M H)).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Optional

from experiments.mnist1d.loop import REPO, RunConfig, launch

RESULTS = REPO / "experiments" / "results" / "mnist1d"
RUNS = RESULTS / "runs"
EQUIV_P = (0.0, 0.01, 0.1, 0.5, 1.0)
GOSSIP_METHODS = ("gossip", "gossip_async", "gossip_outer", "gossip_outer_async", "lightning_gossip")  # the methods with a p and a topology
OUTER_LRS = (0.1, 0.3, 0.7, 1.0)  # issue 18's tuning budget, the same for DiLoCo and the outer-momentum gossip
OUTER_PERIODS = (8, 32)
DEFAULT_OUTER = (0.7, 0.9, 1)  # DiLoCo's outer SGD (lr, momentum, Nesterov): runs with it keep their old names


def _name(cfg: RunConfig) -> str:
    parts = [cfg.method, f"M{cfg.workers}", cfg.split]
    if cfg.model != "mlp":  # the MLP runs keep their original names
        parts.insert(1, cfg.model)
    if cfg.method in GOSSIP_METHODS:
        parts += [f"p{cfg.p:g}", cfg.topology]
    if cfg.method in ("local_sgd", "torchft_localsgd", "torchft_diloco", "gossip_outer", "gossip_outer_async"):
        parts.append(f"H{cfg.period}")
    outer = (cfg.outer_lr, cfg.outer_momentum, cfg.outer_nesterov)
    if cfg.method.startswith("gossip_outer") or (cfg.method == "torchft_diloco" and outer != DEFAULT_OUTER):
        parts.append(f"olr{cfg.outer_lr:g}")
        if outer[1:] != DEFAULT_OUTER[1:]:
            parts.append(f"om{cfg.outer_momentum:g}" + ("" if cfg.outer_nesterov else "hb"))
    if cfg.method == "single":
        parts.append(f"b{cfg.batch_size}")
    parts.append(f"s{cfg.seed}")
    return "_".join(parts)


def runs_equivalence(base: RunConfig, workers: list[int], seeds: list[int], split: str = "iid",
                     ps: tuple[float, ...] = EQUIV_P) -> list[RunConfig]:
    out = []
    for m in workers:
        for s in seeds:
            common = replace(base, workers=m, seed=s, split=split)
            out += [replace(common, method="gossip", p=p) for p in ps]
            out.append(replace(common, method="ddp"))
            if split == "iid":
                out.append(replace(common, method="single", workers=1, batch_size=m * base.batch_size))
    return out


def runs_exploration(base: RunConfig, workers: list[int], seeds: list[int],
                     ps: tuple[float, ...] = EQUIV_P) -> list[RunConfig]:
    return runs_equivalence(base, workers, seeds, split="label_skew", ps=ps)


def runs_topology(base: RunConfig, workers: list[int], seeds: list[int],
                  ps: tuple[float, ...] = (0.05,)) -> list[RunConfig]:
    out = []
    for m in workers:
        for split in ("iid", "label_skew"):
            for p in ps:
                for topo in ("random", "ring", "exponential"):
                    for s in seeds:
                        out.append(replace(base, method="gossip", workers=m, seed=s, split=split, p=p, topology=topo))
    return out


def runs_peers(base: RunConfig, workers: list[int], seeds: list[int], ps: tuple[float, ...] = ()) -> list[RunConfig]:
    out = []
    for m in workers:
        for s in seeds:
            common = replace(base, workers=m, seed=s)
            out += [replace(common, method=k) for k in ("local_sgd", "torchft_localsgd", "torchft_diloco")]
            out += [replace(common, method="lightning_gossip", p=0.1), replace(common, method="lightning_ddp")]
            # gossip at equal bytes with Local SGD every H steps: p * S = 2 (M-1)/M * S / H per worker per step
            out.append(replace(common, method="gossip", p=round(2.0 * (m - 1) / (m * base.period), 4)))
    return out


def runs_asynchronous(base: RunConfig, workers: list[int], seeds: list[int],
                      ps: tuple[float, ...] = (0.1, 0.5, 1.0)) -> list[RunConfig]:
    """The asynchronous mode at the p of the lock-step runs of ``equivalence`` (their JSONs are the comparison)."""
    return [replace(base, method="gossip_async", workers=m, seed=s, p=p) for m in workers for p in ps for s in seeds]


def runs_outer(base: RunConfig, workers: list[int], seeds: list[int], ps: tuple[float, ...] = (0.0,),
               lrs: tuple[float, ...] = OUTER_LRS, periods: tuple[int, ...] = OUTER_PERIODS,
               methods: tuple[str, ...] = ("gossip_outer", "torchft_diloco")) -> list[RunConfig]:
    """Issue 18's tuning: torchft's DiLoCo and the outer-momentum gossip (``gossip_outer``, inner gossip ``p``) on
    the same grid of outer learning rates and periods H (outer momentum 0.9, Nesterov, for both)."""
    out = []
    for m in workers:
        for period in periods:
            for lr in lrs:
                for s in seeds:
                    common = replace(base, workers=m, seed=s, period=period, outer_lr=lr)
                    for method in methods:
                        gossip_ps = ps if method.startswith("gossip_outer") else (0.1,)
                        out += [replace(common, method=method, p=p) for p in gossip_ps]
    return out


def runs_outer_async(base: RunConfig, workers: list[int], seeds: list[int], ps: tuple[float, ...] = (0.0,),
                     lrs: tuple[float, ...] = (0.3,), periods: tuple[int, ...] = (8,),
                     methods: tuple[str, ...] = ("gossip_outer_async",)) -> list[RunConfig]:
    """The outer-momentum gossip in the asynchronous mode, at the lock-step mode's chosen setting by default (the
    lock-step runs of the ``outer`` sweep are the comparison)."""
    return runs_outer(base, workers, seeds, ps, lrs, periods, methods)


SWEEPS: dict[str, Callable[..., list[RunConfig]]] = {
    "equivalence": runs_equivalence, "exploration": runs_exploration, "topology": runs_topology,
    "peers": runs_peers, "asynchronous": runs_asynchronous, "outer": runs_outer, "outer_async": runs_outer_async,
}


# ---------------------------------------------------------------------------------------------------------------------
# the Lightning path (python -m lightning_gossip.train) for gossip and DDP
# ---------------------------------------------------------------------------------------------------------------------
def lightning_command(cfg: RunConfig, run_dir: Path) -> list[str]:
    strategy = ["strategy=gossip", f"strategy.p={cfg.p}", f"strategy.topology={cfg.topology}"] \
        if cfg.method == "lightning_gossip" else ["strategy=ddp"]
    return [sys.executable, "-m", "lightning_gossip.train", "data=mnist1d", f"model=mnist1d_{cfg.model}", *strategy,
            f"trainer.devices={cfg.workers}", f"++trainer.max_steps={cfg.steps}", "trainer.max_epochs=-1",
            f"data.batch_size={cfg.batch_size}", f"data.split={cfg.split}", f"data.alpha={cfg.alpha}",
            f"model.optimizer.lr={cfg.lr}", f"model.optimizer.momentum={cfg.momentum}", f"seed={cfg.seed}",
            f"data.cache_dir={cfg.cache_dir}", "logger=csv", "callbacks=none", "++trainer.enable_checkpointing=false",
            "++trainer.enable_progress_bar=false", "extras.print_config=false", "++trainer.enable_model_summary=false",
            f"hydra.run.dir={run_dir}"]


def run_lightning(cfg: RunConfig, out: Path, nice: int) -> dict:
    run_dir = REPO / "logs" / "mnist1d" / out.stem
    cmd = lightning_command(cfg, run_dir)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    for key in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "RANK",
                "LIGHTNING_GOSSIP_WORKER_CONFIG"):
        env.pop(key, None)
    t0 = time.time()
    proc = subprocess.run((["nice", "-n", str(nice)] if nice else []) + cmd, cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=cfg.timeout_s, start_new_session=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{out.name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    res = json.loads((run_dir / "results.json").read_text())
    counters = res.get("gossip_counters") or {}
    model_bytes = 15210 * 4
    bytes_sent = counters.get("bytes_sent") if counters else \
        2.0 * (cfg.workers - 1) / cfg.workers * model_bytes * res["global_step"]
    result = {"config": asdict(cfg), "world_size": cfg.workers, "command": " ".join(
        ["python"] + [shlex.quote(c.replace(f"{REPO}/", "")) for c in cmd[1:]]),
        "test_acc": res["metrics"].get("test/acc"), "test_loss": res["metrics"].get("test/loss"),
        "global_step": res["global_step"], "bytes_sent_per_worker": bytes_sent,
        "bytes_note": "rank 0's gossip counters" if counters else "ring all-reduce model, per worker",
        "runtime_s": res.get("runtime_s"), "launch_wall_s": time.time() - t0, "gossip_counters": counters or None}
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, out)
    return result


def run_one(cfg: RunConfig, out: Path, nice: int) -> dict:
    if cfg.method.startswith("lightning_"):
        return run_lightning(cfg, out, nice)
    return launch(cfg, out, nice=nice)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Run one MNIST-1D sweep; finished runs (JSON present) are skipped.")
    parser.add_argument("sweep", choices=sorted(SWEEPS))
    parser.add_argument("--workers", default="4", help="comma-separated M values")
    parser.add_argument("--seeds", default="1,2,3")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--period", type=int, default=8, help="Local SGD / DiLoCo: steps between averages")
    parser.add_argument("--p", default=None, help="comma-separated gossip p values (default: the sweep's own)")
    parser.add_argument("--outer-lr", default=None, help="outer sweep: comma-separated outer learning rates")
    parser.add_argument("--periods", default=None, help="outer sweep: comma-separated periods H")
    parser.add_argument("--methods", default=None, help="outer sweep: comma-separated methods")
    parser.add_argument("--outer-momentum", type=float, default=0.9, help="the outer SGD's momentum")
    parser.add_argument("--outer-nesterov", type=int, default=1, help="1: Nesterov, 0: heavy-ball")
    parser.add_argument("--only", default=None, help="run only runs whose name contains this (e.g. gossip_M4)")
    parser.add_argument("--exclude", default=None,
                        help="comma-separated: skip runs whose name contains any of these (e.g. lightning_)")
    parser.add_argument("--model", default="mlp", choices=("mlp", "cnn"), help="the paper's MLP or its 1-D CNN")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once")
    parser.add_argument("--nice", type=int, default=10)
    parser.add_argument("--out", default=str(RUNS))
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--list", action="store_true", help="print the runs and whether they are done")
    args = parser.parse_args(argv)
    base = RunConfig(steps=args.steps, eval_every=args.eval_every, period=args.period, num_samples=args.num_samples,
                     model=args.model, outer_momentum=args.outer_momentum, outer_nesterov=args.outer_nesterov)
    excluded = [e for e in (args.exclude or "").split(",") if e]
    workers = [int(w) for w in args.workers.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    extra = {"ps": tuple(float(p) for p in args.p.split(","))} if args.p else {}
    if args.outer_lr:
        extra["lrs"] = tuple(float(v) for v in args.outer_lr.split(","))
    if args.periods:
        extra["periods"] = tuple(int(v) for v in args.periods.split(","))
    if args.methods:
        extra["methods"] = tuple(args.methods.split(","))
    runs = SWEEPS[args.sweep](base, workers, seeds, **extra)
    # The CNN's runs get their own folders (the report's tables group by method, M, split and p, not by model).
    out_dir = Path(args.out) / (args.sweep if args.model == "mlp" else f"{args.sweep}_{args.model}")
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = []
    for cfg in runs:
        name = _name(cfg)
        if (args.only and args.only not in name) or any(e in name for e in excluded):
            continue
        out = out_dir / f"{name}.json"
        if args.list:
            print(f"{'done' if out.exists() else 'todo'}  {name}")
        elif not out.exists():
            todo.append((cfg, out))
    if args.list:
        return
    with open(out_dir / "commands.log", "a") as f:
        f.write(f"python -m experiments.mnist1d.grid {' '.join(shlex.quote(a) for a in (argv or sys.argv[1:]))}\n")
    print(f"[{args.sweep}] {len(todo)} run(s) to do in {out_dir}", flush=True)

    def go(item):
        cfg, out = item
        t0 = time.time()
        try:
            res = run_one(cfg, out, args.nice)
        except Exception as err:  # keep going: the other runs are independent; a rerun retries this one
            print(f"[{args.sweep}] FAILED {out.stem}: {str(err)[:1500]}", flush=True)
            return
        print(f"[{args.sweep}] {out.stem}: test acc {res['test_acc']:.3f} ({time.time() - t0:.0f} s)", flush=True)

    t0 = time.time()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        list(pool.map(go, todo))
    print(f"[{args.sweep}] finished in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
