"""Turning the workers' records into rows, a JSON file, a markdown table, plots, target checks and a comparison.

Definitions (also written into results.md):

- window: from the moment every rank has finished the warm-up steps to the moment every rank has finished its last
  step; *time per step* = window / (steps - warm-up), *samples/s* = samples of all workers in the window / window;
  *median step* = the median of every rank's step-to-step times in the window (robust to noise; used for ratios);
- *in gossip step* / *in Lightning broadcast*: the time per step (mean over ranks, in the window) spent inside
  ``GossipAverager.step`` (pack, post, wait for the peer, mix) and inside Lightning's per-step SIGTERM broadcast
  (waiting for rank 0 included), timed in-process: unlike step-time differences, these do not drift with the load
  other jobs put on the machine;
- *collectives/step*: Python-level torch.distributed collectives (broadcast, all_reduce, barrier, ...) per step and
  rank in the window: deterministic; gossip needs none, Lightning's per-step SIGTERM broadcast is one, DDP's gradient
  all-reduce runs in C++ and is not counted;
- *CPU ms/step*: CPU time each worker process (all its threads, gloo's included) used per step, mean over ranks:
  the work done, which unlike wall-clock barely depends on how many other jobs share the cores;
- *repeats*: where a scenario runs its configs several times (interleaved), the fastest repeat is reported and all
  are kept in the JSON (``repeats_time_per_step_ms``): their spread is the noise level of the machine;
- *bytes/step* per worker: gossip from the strategy's counters (whole messages: 32-byte header + payload), averaged
  over ranks and all steps; DDP and the periodic all-reduce of local SGD computed from the ring all-reduce volume
  2(M-1)/M x the all-reduced bytes (marked "computed"); *wire bytes/step*: what each worker's own network interface
  sent in the window (TCP/IP headers included), measured in the namespace runs only;
- *consensus accuracy*: the weighted mean sum_i a_i x_i / sum_i a_i of the workers' snapshots, evaluated on a held-out
  set by the harness afterwards (nothing is evaluated during training, so evaluation neither costs time nor
  synchronises the workers); *final accuracy*: the same for the final weights, after the strategy's final consensus;
- *time to target*: wall-clock from the start of training until the first snapshot whose consensus accuracy reaches
  the target, which is the scenario's DDP final accuracy minus 1 point.
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any, Optional

import torch

from experiments.benchmark.common import (
    accuracy,
    load_flat,
    make_data,
    make_model,
    num_params,
    weighted_consensus,
)
from experiments.benchmark.configs import OUTER_ROWS, scenario_repeats
from lightning_gossip.bench.results import fmt_bytes as _fmt_bytes  # one formatting for both reports
from lightning_gossip.bench.results import stamp_line

SCHEMA = "lightning-gossip-benchmark/1"
ROW_KEYS = (
    "scenario", "config", "kind", "status", "workers", "rate_mbit", "straggler", "p", "topology", "overlap",
    "transfer_dtype", "average_every", "per_tensor", "samples_per_s", "time_per_step_ms", "median_step_ms",
    "epoch_s", "bytes_per_step", "bytes_source", "expected_bytes_per_step", "message_bytes", "model_bytes",
    "wire_bytes_per_step", "final_acc", "time_to_target_s", "target_acc", "train_s", "curve",
)
REFERENCES = ("floor", "ddp", "single")
MIN_EXPECTED_MESSAGES = 100  # below this the binomial spread of the message count alone is over 10%


def _nan_to_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def run_dir_name(config: str, repeat: int) -> str:
    return config if repeat == 0 else f"{config}@{repeat}"


def summarize_scenario(sc_dir: str, mode: Any, scenario_name: str, scenario: Any, configs: list[dict]) -> list[dict]:
    """One row per config of a scenario, from the workers' ``rank*.pt`` files."""
    _, _, x_test, y_test = make_data(mode.model, mode.data)
    net = make_model(mode.model)
    rows = []
    for cfg in configs:
        row = {
            "scenario": scenario_name,
            "config": cfg["name"],
            "kind": cfg["kind"],
            "rate_mbit": scenario.rate_mbit if scenario is not None else None,
            "netns": bool(scenario.netns) if scenario is not None else False,
            "straggler": scenario.straggler if scenario is not None else None,
            "p": cfg.get("p"),
            "topology": cfg.get("topology"),
            "overlap": cfg.get("overlap", False),
            "transfer_dtype": cfg.get("transfer_dtype"),
            "average_every": cfg.get("average_every"),
            "per_tensor": cfg.get("per_tensor", False),
            "sigterm_sync": cfg.get("sigterm_sync", True),
            "staleness": cfg.get("staleness"),
            "emulate_compute_ms": scenario.emulate_compute_ms if scenario is not None else None,
        }
        expected_world = 1 if cfg["kind"] == "single" else mode.workers
        candidates, problems = [], []
        for rep in range(scenario_repeats(mode, scenario)):
            run_dir = os.path.join(sc_dir, run_dir_name(cfg["name"], rep))
            files = sorted(f for f in os.listdir(run_dir) if f.startswith("rank")) if os.path.isdir(run_dir) else []
            if len(files) != expected_world:
                problems.append(f"repeat {rep}: {len(files)} of {expected_world} ranks recorded")
                continue
            recs = [torch.load(os.path.join(run_dir, f), weights_only=False) for f in files]
            recs.sort(key=lambda r: r["rank"])
            candidates.append((_timing(recs, mode, cfg), recs))
        if not candidates:
            row["status"] = "missing: " + "; ".join(problems) + " (the scenario failed before this run finished)"
            rows.append(row)
            continue
        # Several repeats (interleaved with the other configs): keep the fastest, since noise only adds time.
        timing, recs = min(candidates, key=lambda c: c[0]["time_per_step_ms"])
        row.update(timing)
        row["repeats_time_per_step_ms"] = [round(c[0]["time_per_step_ms"], 3) for c in candidates]
        row.update(_bytes(recs, mode, cfg))
        row.update(_accuracy(recs, net, x_test, y_test))
        row["status"] = "ok"
        rows.append(row)
    return rows


def _timing(recs: list[dict], mode: Any, cfg: dict) -> dict:
    w, steps = mode.warmup, recs[0]["steps"]
    ends = [r["step_end"] for r in recs]
    window_start = max(e[w - 1] for e in ends)
    window_end = max(e[steps - 1] for e in ends)
    n = steps - w
    per_step = (window_end - window_start) / n
    batch = recs[0]["batch_size"]
    world = len(recs)
    diffs = [b - a for e in ends for a, b in zip(e[w - 1 : steps - 1], e[w:steps])]
    per_rank = [(e[steps - 1] - e[w - 1]) / n for e in ends]
    steps_per_epoch = mode.data["n_train"] / (batch * world)

    def in_window_ms(key: str) -> Optional[float]:
        # mean over ranks of the time per step spent in a call, over the timed window only
        per_rank = [r.get(key) or [] for r in recs]
        if not any(per_rank):
            return None
        return 1e3 * statistics.mean(sum(v[w:steps]) / n for v in per_rank)

    cpu = [r.get("cpu_end") for r in recs]
    coll = [r.get("collectives") for r in recs]
    return {
        "collectives_per_step": statistics.mean(c / n for c in coll) if all(c is not None for c in coll) else None,
        # CPU seconds a rank burns per step (all its threads): the work done, whatever the machine's load
        "cpu_ms_per_step": (1e3 * statistics.mean((c[steps - 1] - c[w - 1]) / n for c in cpu)) if all(cpu) else None,
        "gossip_step_ms": in_window_ms("gossip_step_s"),
        "lightning_broadcast_ms": in_window_ms("broadcast_s"),
        "workers": world,
        "steps": steps,
        "batch_size": batch,
        "samples_per_s": batch * world / per_step,
        "time_per_step_ms": 1e3 * per_step,
        "median_step_ms": 1e3 * statistics.median(diffs),
        "per_rank_step_ms": [1e3 * t for t in per_rank],
        # Each rank at its own pace, as a fully asynchronous scheme could at best: the sum of the ranks' rates.
        "async_bound_samples_per_s": sum(batch / t for t in per_rank),
        "epoch_s": steps_per_epoch * per_step,
        "straggler_sleep_ms": max(1e3 * r.get("sleep_s", 0.0) for r in recs),
        "calibrated_compute_ms": _nan_to_none(statistics.median([1e3 * r["compute_s"] for r in recs])
                                              if all(r.get("compute_s") for r in recs) else None),
    }


def _bytes(recs: list[dict], mode: Any, cfg: dict) -> dict:
    world = len(recs)
    steps = recs[0]["steps"]
    n = steps - mode.warmup
    model_bytes = recs[0]["model_bytes"]
    message_bytes = recs[0]["message_bytes"]
    out: dict[str, Any] = {"model_bytes": model_bytes, "message_bytes": message_bytes or None}
    ring = 2 * (world - 1) / world if world > 1 else 0.0
    if cfg["kind"] == "gossip":
        sent = [r["counters"].get("bytes_sent", 0) for r in recs]
        out["bytes_per_step"] = statistics.mean(sent) / steps
        out["bytes_per_step_per_rank"] = [s / steps for s in sent]
        out["messages_per_step"] = statistics.mean(r["counters"].get("messages_sent", 0) for r in recs) / steps
        out["bytes_source"] = "counters"
        out["expected_bytes_per_step"] = float(cfg.get("p", 0.0)) * message_bytes
        if cfg.get("average_every"):
            # The periodic exact average is a float64 all-reduce of every parameter (plus the weight), not counted.
            numel = model_bytes // 4
            extra = ring * (numel + 1) * 8 / int(cfg["average_every"])
            out["bytes_per_step"] += extra
            out["bytes_source"] = f"counters + computed float64 all-reduce every {cfg['average_every']} steps"
    elif cfg["kind"] == "ddp":
        out["bytes_per_step"] = ring * model_bytes
        out["bytes_source"] = "computed: ring all-reduce 2(M-1)/M x model bytes"
    else:
        out["bytes_per_step"] = 0.0
        out["bytes_source"] = "none (no communication)"
    if all(r.get("tx_window") is not None and r.get("tx_last") is not None for r in recs):
        out["wire_bytes_per_step"] = statistics.mean((r["tx_last"] - r["tx_window"]) / n for r in recs)
    else:
        out["wire_bytes_per_step"] = None
    return out


def _accuracy(recs: list[dict], net: torch.nn.Module, x_test: torch.Tensor, y_test: torch.Tensor) -> dict:
    t_ref = max(r["snapshots"][0]["t"] for r in recs)
    by_step = [{s["step"]: s for s in r["snapshots"]} for r in recs]
    common = sorted(set.intersection(*(set(b) for b in by_step)))
    curve = []
    for step in common:
        snaps = [b[step] for b in by_step]
        flat = weighted_consensus([s["flat"] for s in snaps], [s["weight"] for s in snaps])
        acc = accuracy(load_flat(net, flat), x_test, y_test)
        curve.append([round(max(s["t"] for s in snaps) - t_ref, 4), step, round(acc, 5)])
    finals = [r["final"] for r in recs]
    final_flat = weighted_consensus([f["flat"] for f in finals], [f["weight"] for f in finals])
    final_acc = accuracy(load_flat(net, final_flat), x_test, y_test)
    last = by_step[0][common[-1]]
    local_acc = accuracy(load_flat(net, last["flat"]), x_test, y_test)
    final_t = max(f["t"] for f in finals) - t_ref
    curve.append([round(final_t, 4), "final", round(final_acc, 5)])
    return {"final_acc": final_acc, "rank0_local_acc": local_acc, "train_s": final_t, "curve": curve}


# ---------------------------------------------------------------------------------------------------------------------
def time_to(curve: list, target: float) -> Optional[float]:
    for t, _, acc in curve:
        if acc >= target:
            return t
    return None


def assemble(mode: Any, stamp: dict, scenarios: list[dict], rows: list[dict], netns_ok: bool, reason: str) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    ddp_final = {r["scenario"]: r["final_acc"] for r in ok if r["config"] == "ddp" and not r.get("emulate_compute_ms")}
    fallback_target = statistics.median(ddp_final.values()) if ddp_final else None
    for r in ok:
        if r.get("emulate_compute_ms"):  # emulated compute: tiny batches, accuracy is not the point there
            r["target_acc"], r["time_to_target_s"] = None, None
            continue
        target = ddp_final.get(r["scenario"], fallback_target)
        if target is None:
            target = r["final_acc"]
        r["target_acc"] = round(target - 0.01, 5)
        r["time_to_target_s"] = time_to(r["curve"], r["target_acc"])
    results = {
        "schema": SCHEMA,
        "mode": mode.name,
        "machine": stamp,
        "settings": {
            "workers": mode.workers,
            "steps": mode.steps,
            "warmup_steps": mode.warmup,
            "snapshot_every": mode.snapshot_every,
            "batch_size_per_worker": mode.batch_size,
            "single_batch_size": mode.batch_size * mode.workers,
            "lr": mode.lr,
            "momentum": mode.momentum,
            "model": mode.model,
            "model_params": num_params(mode.model),
            "data": mode.data,
            "threads_per_worker": 1,
            "network_namespaces": netns_ok,
            "network_note": "namespaces + veth + bridge + tc tbf" if netns_ok else f"loopback only: {reason}",
        },
        "scenarios": scenarios,
        "rows": rows,
    }
    results["ratios"] = ratios(results)
    results["targets"] = check_targets(results)
    return results


def _rows(results: dict) -> dict[tuple[str, str], dict]:
    return {(r["scenario"], r["config"]): r for r in results["rows"] if r.get("status") == "ok"}


def ratios(results: dict) -> dict[str, float]:
    """Machine-independent numbers for --compare: costs relative to references measured in the same run."""
    rows = _rows(results)
    single = rows.get(("single", "single"))
    out: dict[str, float] = {}
    for (sc, cfg), r in rows.items():
        if cfg in REFERENCES:
            continue
        floor, ddp = rows.get((sc, "floor")), rows.get((sc, "ddp"))
        if floor:
            out[f"{sc}/{cfg}/step_vs_floor"] = r["median_step_ms"] / floor["median_step_ms"]
            if r.get("cpu_ms_per_step") and floor.get("cpu_ms_per_step"):
                out[f"{sc}/{cfg}/cpu_vs_floor"] = r["cpu_ms_per_step"] / floor["cpu_ms_per_step"]
        if ddp:
            out[f"{sc}/{cfg}/step_vs_ddp"] = r["median_step_ms"] / ddp["median_step_ms"]
        if single:
            out[f"{sc}/{cfg}/time_per_sample_vs_single"] = single["samples_per_s"] / r["samples_per_s"]
        if r["kind"] == "gossip" and r.get("p"):
            out[f"{sc}/{cfg}/bytes_vs_p_message"] = r["bytes_per_step"] / r["expected_bytes_per_step"]
        if r.get("collectives_per_step") is not None:
            out[f"{sc}/{cfg}/collectives_per_step"] = r["collectives_per_step"]
    for sc in {s for s, _ in rows}:
        ddp, floor = rows.get((sc, "ddp")), rows.get((sc, "floor"))
        if ddp and floor:
            out[f"{sc}/ddp/step_vs_floor"] = ddp["median_step_ms"] / floor["median_step_ms"]
    return {k: round(v, 4) for k, v in sorted(out.items())}


def compare(results: dict, baseline: dict, tolerance: float = 2.0, wall_tolerance: float = 4.0,
            acc_tolerance: float = 0.05, bytes_tolerance: float = 0.05) -> tuple[list[str], list[str]]:
    """Regressions of ``results`` against ``baseline``: (problems, report lines).

    Strict, because deterministic: bytes per step against p x message size (the schedule is seeded), zero bytes at
    p = 0, collectives per step (a new per-step barrier or all-reduce in the gossip path), final accuracy, every run
    finishing. Loose, because on 2 shared cores timings of millisecond steps swing by 2-4x from run to run: the CPU
    time per step relative to the floor may grow x(1 + ``tolerance``), wall-clock ratios x(1 + ``wall_tolerance``)
    (gross slowdowns and hangs only); smaller growth is only marked "noise?".
    """
    problems, lines = [], [f"{'ratio':72s} {'baseline':>9s} {'now':>9s}"]
    cur, base = results["ratios"], baseline.get("ratios", {})
    for key in sorted(base):
        if key not in cur:
            lines.append(f"{key:72s} {base[key]:9.3f} {'missing':>9s}")
            continue
        b, c = base[key], cur[key]
        flag = ""
        if key.endswith("bytes_vs_p_message"):
            flag = "REGRESSION" if abs(c - b) > bytes_tolerance else ""
        elif key.endswith("collectives_per_step"):
            flag = "REGRESSION" if c > b + 0.01 else ""  # a new global synchronisation per step
        elif key.endswith("/ddp/step_vs_floor"):
            flag = ""  # a reference, not something this project can regress
        else:
            tol = tolerance if key.endswith("cpu_vs_floor") else wall_tolerance
            if c > b * (1 + tol) and c - b > 0.2:
                flag = "REGRESSION"
            elif c > b * 1.5 and c - b > 0.2:
                flag = "(noise?)"
        if flag == "REGRESSION":
            problems.append(f"{key}: {b:.3f} -> {c:.3f}")
        lines.append(f"{key:72s} {b:9.3f} {c:9.3f} {flag}")
    base_rows, cur_rows = _rows(baseline), _rows(results)
    for key, brow in base_rows.items():
        row = cur_rows.get(key)
        if row is None:
            problems.append(f"{key[0]}/{key[1]}: missing or failed now")
            continue
        if row["final_acc"] < brow["final_acc"] - acc_tolerance:
            problems.append(f"{key[0]}/{key[1]}: final accuracy {brow['final_acc']:.3f} -> {row['final_acc']:.3f}")
        if row["kind"] == "gossip" and not row.get("p") and row["bytes_source"] == "counters" and row["bytes_per_step"]:
            problems.append(f"{key[0]}/{key[1]}: p=0 sent {row['bytes_per_step']:.0f} bytes per step")
    for r in results["rows"]:
        if r.get("status") != "ok":
            problems.append(f"{r['scenario']}/{r['config']}: {r.get('status')}")
    return problems, lines


# ---------------------------------------------------------------------------------------------------------------------
def check_targets(results: dict) -> list[dict]:
    """The issue's targets, each on the stock rows and on the ``_nosync`` rows (Lightning's per-step broadcast off)."""
    rows = _rows(results)
    out = []
    slow = [s for s in results["scenarios"] if s.get("rate_mbit") and not s.get("straggler")
            and not s.get("emulate_compute_ms")]
    slowest = min(slow, key=lambda s: s["rate_mbit"])["name"] if slow else None
    p01 = [f"gossip_p0.1_random_{m}{v}" for v in ("", "_nosync") for m in ("blocking", "overlap", "stale16")]

    def add(name: str, measured: Any, goal: str, met: Optional[bool], note: str = "") -> None:
        out.append({"target": name, "measured": measured, "goal": goal, "met": met, "note": note})

    if slowest:
        ddp = rows.get((slowest, "ddp"))
        cands = sorted(c for (sc, c) in rows if sc == slowest and c.startswith("gossip_p0.1_random_")
                       and "pertensor" not in c and "bfloat16" not in c)
        for cfg in cands:
            g = rows.get((slowest, cfg))
            if ddp and g:
                speed = ddp["epoch_s"] / g["epoch_s"]
                add(f"{slowest}: epoch time DDP / {cfg}", round(speed, 2), ">= 3", speed >= 3)
        for cfg in cands:
            g = rows.get((slowest, cfg))
            if ddp and g:
                tta, half = g["time_to_target_s"], 0.5 * ddp["train_s"]
                add(f"{slowest}: {cfg} time to DDP final acc - 1pt ({g['target_acc']:.3f})",
                    None if tta is None else round(tta, 1), f"<= half DDP wall-clock ({half:.1f} s)",
                    tta is not None and tta <= half,
                    f"final acc {g['final_acc']:.3f}, DDP {ddp['final_acc']:.3f}")
    worst, few = None, 0
    for (sc, cfg), r in rows.items():
        if r["kind"] == "gossip" and r.get("p") and r.get("bytes_per_step") is not None and not r.get("average_every"):
            if r["p"] * results["settings"]["steps"] * r["workers"] < MIN_EXPECTED_MESSAGES:
                few += 1
                continue
            dev = r["bytes_per_step"] / r["expected_bytes_per_step"] - 1
            if worst is None or abs(dev) > abs(worst[0]):
                worst = (dev, f"{sc}/{cfg}")
    if worst:
        add("bytes/step vs p x message size (worst gossip row)", f"{100 * worst[0]:+.1f}% ({worst[1]})",
            "within 20%", abs(worst[0]) <= 0.2,
            f"rows with >= {MIN_EXPECTED_MESSAGES} expected messages (p x steps x M); {few} rows with fewer left out: "
            "the count is binomial, its relative spread is 1/sqrt(p x steps x M)")
    for sc in sorted({s for s, _ in rows}):
        floor = rows.get((sc, "floor"))
        if not floor or floor.get("straggler"):
            continue
        for cfg in ("gossip_p0", "gossip_p0_nosync"):
            r = rows.get((sc, cfg))
            if r:
                over = r["median_step_ms"] / floor["median_step_ms"] - 1
                add(f"{sc}: {cfg} step time over the floor", f"{100 * over:+.1f}%", "<= +5%", over <= 0.05)
        if sc == "loopback":
            for cfg in ("gossip_p0.1_random_overlap", "gossip_p0.1_random_overlap_nosync"):
                r = rows.get((sc, cfg))
                if r:
                    over = r["median_step_ms"] / floor["median_step_ms"] - 1
                    add(f"loopback: {cfg} step time over the floor", f"{100 * over:+.1f}%", "<= +10%", over <= 0.10)
    for s in results["scenarios"]:
        if not s.get("straggler"):
            continue
        base = next((b["name"] for b in results["scenarios"]
                     if not b.get("straggler") and b.get("rate_mbit") == s.get("rate_mbit")
                     and b.get("kind") == s.get("kind")
                     and b.get("emulate_compute_ms") == s.get("emulate_compute_ms")), None)
        if base is None:
            continue
        for cfg in (*p01, "ddp", "local_sgd_h16", "floor", *(row["name"] for row in OUTER_ROWS)):
            a, b = rows.get((s["name"], cfg)), rows.get((base, cfg))
            if a and b:
                keep = a["samples_per_s"] / b["samples_per_s"]
                is_gossip = cfg.startswith("gossip")
                add(f"{s['name']}: {cfg} throughput kept with one worker {s['straggler']['factor']:g}x slower",
                    f"{100 * keep:.0f}%", ">= 75%" if is_gossip else "(reference)",
                    keep >= 0.75 if is_gossip else None)
    return out


# ---------------------------------------------------------------------------------------------------------------------
def _fmt(x: Optional[float], spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def write_markdown(results: dict, path: str) -> None:
    st, se = results["machine"], results["settings"]
    lines = [
        f"# Gossip vs DDP benchmark ({results['mode']} mode)",
        "",
        f"Machine: **{st['cpu_model']}, {st['nproc']} cores** (shared), torch {st['torch']}, python {st['python']}, "
        f"{st['date']}; load average at start {st['loadavg_1min_at_start']}.",
        "",
        f"{se['workers']} workers (processes, 1 thread each), MLP with {se['model_params']:,} parameters "
        f"({se['model']}), batch {se['batch_size_per_worker']} per worker (single: {se['single_batch_size']}), "
        f"{se['steps']} steps ({se['warmup_steps']} warm-up), SGD lr {se['lr']} momentum {se['momentum']}, "
        f"synthetic data {se['data']}. Network: {se['network_note']}.",
        "",
        "**Read with care:** all workers share the same few CPU cores (and other people's jobs), so compute "
        "contention, not only the network, shapes these numbers; ratios measured in one run are more meaningful "
        "than absolute times. `floor` = the same number of independent processes training with no communication "
        "at all (the time floor under the same contention); `single` = one process with a batch of M x b.",
        "",
        "| scenario | network | straggler | load | measured link | wall |",
        "|---|---|---|---|---|---|",
    ]
    for s in results["scenarios"]:
        net = "loopback" if s["kind"] == "loopback" else f"netns, tbf {s['rate_mbit']:g} Mbit/s"
        strag = f"rank {s['straggler']['rank']} x{s['straggler']['factor']:g}" if s.get("straggler") else "-"
        meas = f"{s['measured_mbit']} Mbit/s" if s.get("measured_mbit") else "-"
        lines.append(f"| {s['name']} | {net} | {strag} | {s.get('loadavg_1min')} | {meas} | {s.get('wall_s')} s |")
    lines += ["", "## Results", ""]
    header = ("| config | samples/s | ms/step (mean) | ms/step (median) | CPU ms/step | collectives/step | "
              "in gossip step | in Lightning broadcast | "
              "epoch s | bytes/step/worker | source | wire bytes/step | final acc | time to target | train s |")
    by_scenario: dict[str, list[dict]] = {}
    for r in results["rows"]:
        by_scenario.setdefault(r["scenario"], []).append(r)
    for sc, rows in by_scenario.items():
        target = next((r.get("target_acc") for r in rows if r.get("target_acc") is not None), None)
        lines += [f"### {sc}" + (f" (target accuracy {target:.3f})" if target else ""), "", header,
                  "|" + "---|" * 15]
        for r in rows:
            if r.get("status") != "ok":
                lines.append(f"| {r['config']} | {r.get('status')} |" + " |" * 13)
                continue
            src = "counters" if r["bytes_source"] == "counters" else (
                "computed" if "computed" in r["bytes_source"] else "-")
            lines.append(
                f"| {r['config']} | {r['samples_per_s']:.0f} | {r['time_per_step_ms']:.1f} | "
                f"{r['median_step_ms']:.1f} | {_fmt(r.get('cpu_ms_per_step'))} | "
                f"{_fmt(r.get('collectives_per_step'), '.2f')} | {_fmt(r.get('gossip_step_ms'), '.2f')} | "
                f"{_fmt(r.get('lightning_broadcast_ms'), '.2f')} | {r['epoch_s']:.1f} | "
                f"{_fmt_bytes(r['bytes_per_step'])} | {src} | "
                f"{_fmt_bytes(r.get('wire_bytes_per_step'))} | {r['final_acc']:.3f} | "
                f"{_fmt(r.get('time_to_target_s'))} | {r['train_s']:.1f} |")
        if any(r.get("straggler") for r in rows):
            lines += ["", "Per-rank mean step time (ms), and the samples/s a fully asynchronous scheme could reach "
                          "at best (each rank at its own pace):", ""]
            for r in rows:
                if r.get("status") == "ok":
                    per = ", ".join(f"{t:.0f}" for t in r["per_rank_step_ms"])
                    bound = r["async_bound_samples_per_s"]
                    lines.append(f"- {r['config']}: [{per}], async bound {bound:.0f} samples/s")
        lines.append("")
    lines += ["## Speed work: before / after", "",
              "| scenario | change | before (ms/step median) | after | speed-up |", "|---|---|---|---|---|"]
    rows_by = _rows(results)
    pairs = [
        ("one message per tensor -> one flat message", "gossip_p0.1_random_blocking_pertensor",
         "gossip_p0.1_random_blocking"),
        ("one message per tensor -> one flat message", "gossip_p0.5_random_blocking_pertensor",
         "gossip_p0.5_random_blocking"),
        ("blocking -> overlapped", "gossip_p0.1_random_blocking", "gossip_p0.1_random_overlap"),
        ("blocking -> overlapped", "gossip_p0.5_random_blocking", "gossip_p0.5_random_overlap"),
        ("fp32 -> bf16 transfer (blocking)", "gossip_p0.1_random_blocking", "gossip_p0.1_random_blocking_bfloat16"),
        ("fp32 -> bf16 transfer (blocking)", "gossip_p0.5_random_blocking", "gossip_p0.5_random_blocking_bfloat16"),
        ("fp32 -> bf16 transfer (overlapped)", "gossip_p0.1_random_overlap", "gossip_p0.1_random_overlap_bfloat16"),
    ]
    for k in (4, 16):
        for p_ in ("0.1", "0.5"):
            pairs.append((f"overlapped (1 step) -> bounded staleness {k} steps (stock)",
                          f"gossip_p{p_}_random_overlap", f"gossip_p{p_}_random_stale{k}"))
            pairs.append((f"overlapped (1 step) -> bounded staleness {k} steps (both without the broadcast)",
                          f"gossip_p{p_}_random_overlap_nosync", f"gossip_p{p_}_random_stale{k}_nosync"))
    for cfg in ("gossip_p0", "local_sgd_h16", "local_sgd_h10", "gossip_p0.1_random_blocking",
                "gossip_p0.1_random_overlap", "gossip_p0.5_random_blocking", "gossip_p0.5_random_overlap"):
        pairs.append(("Lightning's SIGTERM broadcast as shipped -> off", cfg, cfg + "_nosync"))
    for sc in by_scenario:
        for label, before, after in pairs:
            a, b = rows_by.get((sc, before)), rows_by.get((sc, after))
            if a and b:
                lines.append(f"| {sc} | {label} | {a['median_step_ms']:.1f} | {b['median_step_ms']:.1f} | "
                             f"{a['median_step_ms'] / b['median_step_ms']:.2f}x |")
    lines += ["", "## Targets (issue 4)", "", "| target | measured | goal | met | note |", "|---|---|---|---|---|"]
    for t in results["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        lines.append(f"| {t['target']} | {t['measured']} | {t['goal']} | {met} | {t['note']} |")
    lines += ["", "## Definitions", "", __doc__.split("Definitions (also written into results.md):", 1)[1].strip(), ""]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
def write_plots(results: dict, out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(results)
    stamp = stamp_line(results["machine"])
    settings = results["settings"]
    title_suffix = f"({settings['workers']} workers, {settings['model_params'] / 1e6:.2f}M params)"
    plain = [s for s in results["scenarios"] if not s.get("straggler")]
    # bandwidth axis: slowest first, loopback last
    plain.sort(key=lambda s: s["rate_mbit"] if s.get("rate_mbit") else float("inf"))
    labels = [f"{s['rate_mbit']:g} Mbit/s" if s.get("rate_mbit") else "loopback" for s in plain]
    families = [c for c in ("ddp", "gossip_p0.1_random_blocking", "gossip_p0.1_random_overlap",
                            "gossip_p0.1_random_overlap_bfloat16", "gossip_p0.5_random_blocking",
                            "gossip_p0.5_random_overlap", "local_sgd_h16", "local_sgd_h10", "gossip_p0", "floor")
                if any((s["name"], c) in rows for s in plain)]
    written = []

    def finish(fig: Any, name: str) -> None:
        fig.text(0.01, 0.005, stamp, fontsize=7, color="gray", ha="left", va="bottom")
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        path = os.path.join(out_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for metric, ylabel, name in (("samples_per_s", "samples/s (all workers)", "throughput_vs_bandwidth.png"),
                                 ("time_to_target_s", "time to target accuracy (s)", "tta_vs_bandwidth.png")):
        if not any(r.get(metric) is not None for r in rows.values()):
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for fam in families:
            ys = [rows.get((s["name"], fam), {}).get(metric) for s in plain]
            xs = [i for i, y in enumerate(ys) if y is not None]
            if xs:
                ax.plot(xs, [ys[i] for i in xs], marker="o", label=fam)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel("link bandwidth per worker")
        ax.set_ylabel(ylabel)
        if metric == "time_to_target_s":
            ax.set_yscale("log")
            ax.set_title(f"Time to DDP's final accuracy - 1 pt {title_suffix}\n(missing point: target not reached)",
                         fontsize=10)
        else:
            ax.set_yscale("log")
            ax.set_title(f"Throughput vs bandwidth {title_suffix}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if not ax.lines:
            plt.close(fig)
            continue
        ax.legend(fontsize=7)
        finish(fig, name)

    for metric, ylabel, name in (("samples_per_s", "samples/s (all workers)", "throughput_vs_p.png"),
                                 ("time_to_target_s", "time to target accuracy (s)", "tta_vs_p.png")):
        if not any(r.get(metric) is not None for r in rows.values()):
            continue
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        for s, label in zip(plain, labels):
            pts = []
            for (sc, cfg), r in rows.items():
                if sc != s["name"] or r["kind"] != "gossip" or r.get("average_every") or r.get("per_tensor"):
                    continue
                if r.get("transfer_dtype") or (r.get("topology") or "random") != "random" or r.get("staleness"):
                    continue
                if not r.get("sigterm_sync", True):
                    continue
                if r.get("p") and not r.get("overlap"):
                    continue  # the p sweep is overlapped; p = 0 has nothing to overlap
                if r.get(metric) is not None:
                    pts.append((r["p"] or 0.0, r[metric]))
            if len(pts) >= 2:
                pts.sort()
                line, = ax.plot([p for p, _ in pts], [v for _, v in pts], marker="o", label=f"gossip, {label}")
                ddp = rows.get((s["name"], "ddp"), {}).get(metric)
                if ddp is not None:
                    ax.axhline(ddp, color=line.get_color(), ls="--", lw=1, label=f"DDP, {label}")
        ax.set_xscale("symlog", linthresh=0.03)
        ticks = sorted({p for (_, _), r in rows.items() if r["kind"] == "gossip" and r.get("p") is not None
                        for p in [r["p"]]})
        ax.set_xlim(-0.003, max(ticks + [0.1]) * 1.3)
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel("gossip probability p (overlapped, random peer; p=0: no exchange)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title(("Throughput" if metric == "samples_per_s" else "Time to target") + f" vs p {title_suffix}",
                     fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        if not ax.lines:
            plt.close(fig)
            continue
        ax.legend(fontsize=7)
        finish(fig, name)

    for s in results["scenarios"]:
        if s.get("emulate_compute_ms"):
            continue  # emulated compute: tiny batches, the accuracy is not the point of those scenarios
        fig, ax = plt.subplots(figsize=(7.5, 4.5))
        shown = 0
        base = ("single", "ddp", "gossip_p0.1_random_blocking", "gossip_p0.1_random_overlap",
                "gossip_p0.1_random_stale16", "gossip_p0.5_random_blocking", "local_sgd_h16", "local_sgd_h10",
                "floor", "gossip_p1_random_overlap")
        # the tta suite runs gossip for twice the steps (configs named ..._2xsteps)
        for fam in (*base, *(f"{name}_2xsteps" for name in base)):
            r = rows.get((s["name"], fam)) or (rows.get(("single", "single")) if fam == "single" else None)
            if r is None:
                continue
            pts = [(t, a) for t, _, a in r["curve"]]
            ax.plot([t for t, _ in pts], [a for _, a in pts], marker=".", label=fam)
            shown += 1
        target = next((r.get("target_acc") for (sc, _), r in rows.items() if sc == s["name"]), None)
        if target:
            ax.axhline(target, color="gray", ls=":", lw=1, label="target")
        if shown:
            ax.set_xlabel("wall-clock since start of training (s)")
            ax.set_ylabel("consensus test accuracy")
            ax.set_title(f"Accuracy vs time, {s['name']} {title_suffix}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
            finish(fig, f"accuracy_vs_time_{s['name']}.png")
        else:
            plt.close(fig)
    return written
