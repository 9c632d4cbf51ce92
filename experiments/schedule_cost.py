"""Per-step cost of the gossip schedule at 4, 64 and 1024 workers: the plan, and one rank's questions about it
(``target_of``, ``sources_of``, what the exchange asks every step), before (pure-Python hashing of every rank's
draws, re-implemented here from ``uniform``) and after vectorisation.

    python -m experiments.schedule_cost [--steps 2000] [--out experiments/results/mnist1d/scale/schedule_cost.json]

Timings are the median over repeats of the mean per step; on a shared, loaded machine they are noisy.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Optional

from lightning_gossip.gossip.schedule import GossipSchedule, uniform
from lightning_gossip.gossip.topology import RandomPeer


def plan_before(world: int, p: float, topology, seed: int, step: int) -> tuple[Optional[int], ...]:
    """The schedule as it was: one full Python hash chain per rank and stream."""
    sends: list[Optional[int]] = [None] * world
    for rank in range(world):
        if uniform(seed, step, rank, 0) < p:
            sends[rank] = topology.peer(rank, world, step, uniform(seed, step, rank, 1))
    return tuple(sends)


def per_step_us(fn, steps: int, repeats: int = 5) -> float:
    samples = []
    for r in range(repeats):
        t0 = time.perf_counter()
        for t in range(steps):
            fn(r * steps + t)
        samples.append((time.perf_counter() - t0) / steps * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--p", type=float, default=0.1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for world in (4, 64, 1024):
        topo = RandomPeer()
        schedule = GossipSchedule(world, args.p, topo, seed=1)
        steps = max(50, args.steps // (1 + world // 64))
        before = per_step_us(lambda t: plan_before(world, args.p, topo, 1, t), steps)
        after = per_step_us(lambda t: schedule.plan(t), steps)

        def rank_view(t: int) -> None:
            plan = schedule.plan(t)
            plan.target_of(0)
            plan.sources_of(0)

        after_with_view = per_step_us(rank_view, steps)
        rows.append({"world_size": world, "before_us": round(before, 2), "after_us": round(after, 2),
                     "after_plan_and_rank_view_us": round(after_with_view, 2), "steps": steps})
        print(f"M={world:5d}: before {before:8.1f} us/step   after {after:6.1f} us/step   "
              f"(plan + target_of + sources_of {after_with_view:6.1f} us)", flush=True)
    result = {"p": args.p, "rows": rows, "python": platform.python_version(), "machine": platform.machine(),
              "note": "measured on a shared 2-core machine loaded by other work: noisy"}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
