"""Which configurations the benchmark runs, in each mode.

A *config* is one training setup (DDP, gossip with some p/topology/overlap/dtype, local SGD, ...). A *scenario* is
one launch of the workers on one network setting (loopback, or namespaces at some rate), optionally with a straggler;
the configs of a scenario run one after another in the same worker processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from experiments.benchmark.common import DATA_FULL, DATA_QUICK, MODEL_FULL, MODEL_QUICK


def gossip(p: float, topology: str = "random", overlap: bool = False, dtype: Optional[str] = None,
           per_tensor: bool = False, staleness: Optional[int] = None) -> dict[str, Any]:
    mode = f"stale{staleness}" if staleness else ("overlap" if overlap else "blocking")
    name = f"gossip_p{p:g}_{topology}_{mode}" + (f"_{dtype}" if dtype else "") + ("_pertensor" if per_tensor else "")
    return {"name": name, "kind": "gossip", "p": p, "topology": topology, "overlap": overlap,
            "transfer_dtype": dtype, "per_tensor": per_tensor, "staleness": staleness}


DDP = {"name": "ddp", "kind": "ddp"}
FLOOR = {"name": "floor", "kind": "floor"}  # M independent processes, no communication at all: the time floor
GOSSIP_P0 = {"name": "gossip_p0", "kind": "gossip", "p": 0.0, "topology": "random", "overlap": False}


def local_sgd(h: int) -> dict[str, Any]:
    return {"name": f"local_sgd_h{h}", "kind": "gossip", "p": 0.0, "average_every": h}


def outer(h: int, lr: float, momentum: float = 0.9) -> dict[str, Any]:
    """Outer-momentum gossip (issue 18): no gossip between outer steps, a random pairing and an outer step every h."""
    return {"name": f"gossip_outer_h{h}_lr{lr:g}", "kind": "gossip", "p": 0.0, "outer_every": h, "outer_lr": lr,
            "outer_momentum": momentum}


def longer(cfg: dict[str, Any], factor: int) -> dict[str, Any]:
    """The same config run for ``factor`` times the steps (to see when it reaches a target in wall-clock time)."""
    return {**cfg, "name": cfg["name"] + f"_{factor}xsteps", "steps_factor": factor}


def nosync(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same config without Lightning's per-step SIGTERM broadcast from rank 0 (see worker.py)."""
    return {**cfg, "name": cfg["name"] + "_nosync", "sigterm_sync": False}


@dataclass
class Scenario:
    name: str
    rate_mbit: Optional[float]  # None: loopback (no limit)
    configs: list[dict[str, Any]]
    straggler: Optional[dict[str, Any]] = None
    netns: bool = False  # run inside namespaces (rate_mbit=None there means: namespaces, no limit)
    repeats: Optional[int] = None  # None: the mode's
    batch_size: Optional[int] = None  # None: the mode's
    # Emulated compute: every rank sleeps this long per step (on top of a small real step), so CPU contention on a
    # small machine stops hiding lock-step effects; accuracy is then not comparable with the other scenarios.
    emulate_compute_ms: Optional[float] = None


@dataclass
class Mode:
    name: str
    workers: int
    steps: int
    warmup: int
    snapshot_every: int
    batch_size: int
    lr: float
    model: dict[str, int]
    data: dict[str, Any]
    local_sgd_h: int
    scenarios: list[Scenario] = field(default_factory=list)
    single: bool = True
    momentum: float = 0.9
    repeats: int = 1  # each scenario's config list is run this many times, interleaved; the fastest repeat counts


def full_mode(workers: int, netns_ok: bool, rates: list[float], straggler_factor: float) -> Mode:
    mode = Mode("full", workers, steps=300, warmup=20, snapshot_every=20, batch_size=32, lr=0.05,
                model=MODEL_FULL, data=DATA_FULL, local_sgd_h=16)
    h = mode.local_sgd_h
    core = [
        FLOOR, GOSSIP_P0, DDP, local_sgd(h),
        gossip(0.1), gossip(0.1, overlap=True),
        gossip(0.1, dtype="bfloat16"), gossip(0.1, overlap=True, dtype="bfloat16"),
        gossip(0.1, per_tensor=True),
        nosync(GOSSIP_P0), nosync(local_sgd(h)), nosync(gossip(0.1)), nosync(gossip(0.1, overlap=True)),
    ]
    sweep = [
        gossip(0.1, "ring", overlap=True), gossip(0.1, "exponential", overlap=True),
        gossip(0.03, overlap=True), gossip(0.3, overlap=True), gossip(1.0, overlap=True),
        gossip(0.1, staleness=16), nosync(gossip(0.1, staleness=16)),  # bounded staleness (the library's staleness=K)
    ]
    straggle = [FLOOR, DDP, local_sgd(h), gossip(0.1), gossip(0.1, overlap=True),
                nosync(gossip(0.1)), nosync(gossip(0.1, overlap=True)), nosync(gossip(0.1, staleness=16))]
    lag = {"rank": workers - 1, "factor": straggler_factor}
    mode.scenarios.append(Scenario("loopback", None, core + sweep))
    mode.scenarios.append(Scenario(f"loopback_straggler{straggler_factor:g}x", None, straggle, straggler=lag))
    if netns_ok:
        for rate in sorted(rates, reverse=True):
            slow = rate == min(rates)
            mode.scenarios.append(Scenario(f"{rate:g}mbit", rate, core + (sweep if slow else []), netns=True))
        slowest = min(rates)
        mode.scenarios.append(Scenario(f"{slowest:g}mbit_straggler{straggler_factor:g}x", slowest, straggle,
                                       straggler=lag, netns=True))
    return mode


def smoke_mode(workers: int) -> Mode:
    """The smallest run (what tests/benchmark runs): loopback, a tiny model. (The quick CI benchmark is the packaged
    ``python -m lightning_gossip.bench --config experiments/benchmark/quick.yaml``.)"""
    mode = Mode("smoke", workers, steps=200, warmup=10, snapshot_every=50, batch_size=16, lr=0.05,
                model=MODEL_QUICK, data=DATA_QUICK, local_sgd_h=10)
    mode.scenarios.append(Scenario("loopback", None, [FLOOR, GOSSIP_P0, DDP, gossip(0.5), nosync(GOSSIP_P0)]))
    return mode


SUITES = ("full", "overhead", "straggler", "tta")
# The outer-momentum rows of the tta and straggler suites: "gossip_outer"'s registered setting, and the same at
# local SGD's period here (16).
OUTER_ROWS = (outer(8, 0.3), outer(16, 0.3))


def scenario_repeats(mode: Mode, scenario: Optional[Scenario]) -> int:
    """How many times a scenario runs its configs: its own ``repeats``, else the mode's."""
    return (scenario.repeats if scenario is not None and scenario.repeats else None) or mode.repeats


def overhead_suite(workers: int) -> Mode:
    """The p = 0 and overlap overhead targets: loopback, short runs, 3 interleaved repeats (the fastest counts)."""
    mode = Mode("overhead", workers, steps=150, warmup=20, snapshot_every=50, batch_size=32, lr=0.05,
                model=MODEL_FULL, data=DATA_FULL, local_sgd_h=16, repeats=3, single=False)
    configs = [FLOOR, GOSSIP_P0, nosync(GOSSIP_P0), gossip(0.1, overlap=True), nosync(gossip(0.1, overlap=True)),
               nosync(gossip(0.1)), gossip(0.1, staleness=16), nosync(gossip(0.1, staleness=16))]
    mode.scenarios.append(Scenario("loopback", None, configs))
    return mode


def straggler_suite(workers: int, netns_ok: bool, rate: float, factor: float, emulate_ms: float = 40.0) -> Mode:
    """Lock-step against a straggler with compute emulated by sleeping, so 2 shared cores do not hide it."""
    mode = Mode("straggler", workers, steps=200, warmup=20, snapshot_every=50, batch_size=8, lr=0.05,
                model=MODEL_FULL, data=DATA_FULL, local_sgd_h=16, single=False)
    configs = [FLOOR, DDP, gossip(0.1, overlap=True), nosync(gossip(0.1)), nosync(gossip(0.1, overlap=True)),
               gossip(0.1, staleness=16), nosync(gossip(0.1, staleness=16)), local_sgd(16), *OUTER_ROWS]
    lag = {"rank": workers - 1, "factor": factor}
    nets = [(None, "loopback", False)] + ([(rate, f"{rate:g}mbit", True)] if netns_ok else [])
    for r, name, ns in nets:
        for strag in (None, lag):
            label = f"{name}_emulated{emulate_ms:g}ms" + (f"_straggler{factor:g}x" if strag else "")
            mode.scenarios.append(Scenario(label, r, configs, straggler=strag, netns=ns, emulate_compute_ms=emulate_ms))
    return mode


def tta_suite(workers: int, netns_ok: bool, rate: float) -> Mode:
    """Time to DDP's final accuracy - 1 point on the slow link, letting gossip use its speed: 2x the steps."""
    mode = Mode("tta", workers, steps=300, warmup=20, snapshot_every=20, batch_size=32, lr=0.05,
                model=MODEL_FULL, data=DATA_FULL, local_sgd_h=16, single=False)
    configs = [DDP, longer(gossip(0.1, overlap=True), 2), longer(nosync(gossip(0.1, overlap=True)), 2),
               longer(gossip(0.1, staleness=16), 2), longer(nosync(gossip(0.1, staleness=16)), 2),
               longer(local_sgd(16), 2), *(longer(row, 2) for row in OUTER_ROWS)]
    if netns_ok:
        mode.scenarios.append(Scenario(f"{rate:g}mbit", rate, configs, netns=True))
    else:
        mode.scenarios.append(Scenario("loopback", None, configs))
    return mode
