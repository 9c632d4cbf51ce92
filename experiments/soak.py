"""Soak run: many gossip steps on real gloo processes; weight mass, memory and file descriptors must not drift.

    python experiments/soak.py                          # 4 workers, 10,000 steps, blocking, overlap, staleness 8
    python experiments/soak.py --steps 1000 --out DIR   # shorter (the opt-in `pytest -m soak` test runs this)

Each worker trains a tiny MLP (with BatchNorm, so buffers are gossiped too) with SGD on random batches and runs a
GossipAverager step after every optimizer step (p=0.5, random peer). After every step the workers all-reduce their
gossip weights, plus what is in flight to them (overlap / staleness modes), and record |sum - 1|; every
``--consensus-every`` steps they also compute the consensus distance (the collective path of evaluation and
checkpoints). Resident memory (VmRSS) and open file descriptors are measured per worker after a warm-up of
``--warmup`` steps ("start") and at the end ("end"), and sampled along the way. Results go to ``OUT/soak.json``; the
exit status is non-zero if a check fails: mass error above ``--mass-tol``, RSS growth above ``--rss-tol-mib``, or any
growth in file descriptors.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.elastic.utils.distributed import get_free_port
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def import_gossip() -> Any:
    """``lightning_gossip.gossip``, which imports no Lightning, so the soak measures the algorithm's own memory."""
    import lightning_gossip.gossip as gossip

    assert "lightning" not in sys.modules, "lightning_gossip.gossip imported Lightning"
    return gossip


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def worker(rank: int, world_size: int, port: int, cfg: dict, queue: Any) -> None:
    try:
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=cfg["timeout_s"])
        )
        gossip_module = import_gossip()
        torch.manual_seed(rank)
        model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        gossip = gossip_module.GossipAverager(
            model, p=cfg["p"], topology=cfg["topology"], seed=cfg["seed"], staleness=cfg["staleness"]
        )
        data = torch.Generator().manual_seed(1000 + rank)
        x_all = torch.randn(256, 16, generator=data)
        y_all = torch.randint(0, 4, (256,), generator=data)
        mass = torch.zeros(1, dtype=torch.float64)
        max_mass_error = 0.0
        worst_step = -1
        samples = []
        start: dict[str, Any] = {}
        distances = []
        half_rss = None
        t0 = time.perf_counter()
        for step in range(cfg["steps"]):
            if step == cfg["warmup"]:
                start = {"step": step, "rss_kib": rss_kib(), "fds": open_fds(), "time": time.perf_counter()}
            if step == (cfg["warmup"] + cfg["steps"]) // 2:
                half_rss = rss_kib()
            index = torch.randint(0, 256, (16,), generator=data)
            opt.zero_grad(set_to_none=False)
            nn.functional.cross_entropy(model(x_all[index]), y_all[index]).backward()
            opt.step()
            gossip.step()
            if (step + 1) % cfg["check_every"] == 0:
                mass[0] = gossip.weight + gossip.in_flight_weight()
                dist.all_reduce(mass)
                error = abs(float(mass.item()) - 1.0)
                if error > max_mass_error:
                    max_mass_error, worst_step = error, step
            if cfg["consensus_every"] and (step + 1) % cfg["consensus_every"] == 0:
                distances.append(gossip.consensus_distance())
            if (step + 1) % cfg["sample_every"] == 0:
                samples.append({"step": step + 1, "rss_kib": rss_kib(), "fds": open_fds()})
        gossip.finish()
        mass[0] = gossip.weight
        dist.all_reduce(mass)
        final_error = abs(float(mass.item()) - 1.0)
        end = {"step": cfg["steps"], "rss_kib": rss_kib(), "fds": open_fds(), "time": time.perf_counter()}
        measured_steps = cfg["steps"] - start["step"]
        queue.put(
            (
                rank,
                "ok",
                {
                    "max_mass_error": max(max_mass_error, final_error),
                    "worst_step": worst_step,
                    "final_mass_error": final_error,
                    "rss_kib_start": start["rss_kib"],
                    "rss_kib_end": end["rss_kib"],
                    "rss_growth_kib": end["rss_kib"] - start["rss_kib"],
                    "fds_start": start["fds"],
                    "fds_end": end["fds"],
                    "fds_growth": end["fds"] - start["fds"],
                    # A leak grows steadily; allocator warm-up levels off: growth over the second half alone.
                    "rss_growth_second_half_kib": end["rss_kib"] - half_rss if half_rss is not None else None,
                    "steps_per_s": measured_steps / (end["time"] - start["time"]),
                    "wall_s": end["time"] - t0,
                    "counters": gossip.counters.as_dict(),
                    "final_weight": gossip.weight,
                    "consensus_distance_last": distances[-1] if distances else None,
                    "samples": samples,
                },
            )
        )
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def staleness_of_mode(mode: str) -> int:
    """``blocking`` -> 0, ``overlap`` -> 1, ``stale<K>`` -> K."""
    if mode in ("blocking", "overlap"):
        return int(mode == "overlap")
    if mode.startswith("stale") and mode[len("stale"):].isdigit():
        return int(mode[len("stale"):])
    raise SystemExit(f"unknown soak mode {mode!r}: use blocking, overlap or stale<K> (e.g. stale8)")


def run_mode(world_size: int, cfg: dict, deadline_s: float) -> list[dict]:
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    port = get_free_port()
    procs = [ctx.Process(target=worker, args=(r, world_size, port, cfg, queue)) for r in range(world_size)]
    results: dict[int, Any] = {}
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + deadline_s
        while len(results) < world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"soak did not finish within {deadline_s}s (results from ranks {sorted(results)})")
            if queue.empty():
                if any(p.exitcode not in (None, 0) for p in procs):
                    time.sleep(0.5)  # let a dying rank's report arrive
                    if queue.empty():
                        raise RuntimeError(f"a worker died: exit codes {[p.exitcode for p in procs]}")
                time.sleep(0.1)
                continue
            rank, status, value = queue.get()
            if status != "ok":
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            results[rank] = value
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=10)
    return [results[r] for r in range(world_size)]


def machine() -> dict:
    info = {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "host_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--modes", default="blocking,overlap,stale8",
                        help="comma list of blocking, overlap, stale<K> (bounded staleness K)")
    parser.add_argument("--p", type=float, default=0.5)
    parser.add_argument("--topology", default="random")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=500, help="steps before the 'start' measurement")
    parser.add_argument("--check-every", type=int, default=1, help="steps between mass all-reduces")
    parser.add_argument("--consensus-every", type=int, default=1000)
    parser.add_argument("--sample-every", type=int, default=1000)
    parser.add_argument("--timeout-s", type=float, default=60.0, help="process-group timeout")
    parser.add_argument("--deadline-s", type=float, default=3600.0, help="whole run, per mode")
    parser.add_argument("--mass-tol", type=float, default=1e-12)
    parser.add_argument("--rss-tol-mib", type=float, default=4.0, help="allowed RSS growth per worker")
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "soak"))
    args = parser.parse_args(argv)
    if args.warmup >= args.steps:
        parser.error("--warmup must be smaller than --steps")

    report: dict[str, Any] = {"machine": machine(), "config": vars(args), "modes": {}, "checks": {}}
    ok = True
    for mode in args.modes.split(","):
        cfg = {
            "steps": args.steps,
            "p": args.p,
            "topology": args.topology,
            "seed": args.seed,
            "staleness": staleness_of_mode(mode),
            "warmup": args.warmup,
            "check_every": args.check_every,
            "consensus_every": args.consensus_every,
            "sample_every": args.sample_every,
            "timeout_s": args.timeout_s,
        }
        started = time.perf_counter()
        ranks = run_mode(args.workers, cfg, args.deadline_s)
        summary = {
            "wall_s": round(time.perf_counter() - started, 1),
            "max_mass_error": max(r["max_mass_error"] for r in ranks),
            "mass_checks": args.steps // args.check_every + 1,
            "messages_sent": sum(r["counters"]["messages_sent"] for r in ranks),
            "messages_rejected": sum(r["counters"]["messages_rejected"] for r in ranks),
            "max_rss_growth_kib": max(r["rss_growth_kib"] for r in ranks),
            "max_rss_growth_second_half_kib": max(r["rss_growth_second_half_kib"] for r in ranks),
            "max_fd_growth": max(r["fds_growth"] for r in ranks),
            "min_steps_per_s": round(min(r["steps_per_s"] for r in ranks), 1),
        }
        checks = {
            "mass": summary["max_mass_error"] <= args.mass_tol,
            "rss": summary["max_rss_growth_kib"] <= args.rss_tol_mib * 1024,
            "fds": summary["max_fd_growth"] <= 0,
            "traffic": summary["messages_sent"] > 0 and all(r["counters"]["steps"] == args.steps for r in ranks),
        }
        report["modes"][mode] = {"summary": summary, "ranks": ranks}
        report["checks"][mode] = checks
        ok = ok and all(checks.values())
        print(f"{mode}: {json.dumps(summary)} checks={checks}", flush=True)
    report["passed"] = ok
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out / 'soak.json'}; {'PASSED' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
