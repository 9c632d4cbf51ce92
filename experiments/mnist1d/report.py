"""Tables (markdown + CSV) and PNG plots from the run JSONs under experiments/results/mnist1d/runs/.

    python -m experiments.mnist1d.report [--runs experiments/results/mnist1d/runs]

Every number in a table is a mean +- standard deviation over the seeds that finished (n is shown); nothing is
re-run. Missing runs are simply absent, so the report can be built from a partial grid.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional

from experiments.mnist1d.grid import GOSSIP_METHODS, RESULTS, RUNS


def load(runs: Path, sweep: str) -> list[dict[str, Any]]:
    return [json.loads(f.read_text()) for f in sorted((runs / sweep).glob("*.json"))]


def key_of(r: dict[str, Any]) -> tuple:
    c = r["config"]
    p = c["p"] if c["method"] in GOSSIP_METHODS else None
    topo = c["topology"] if c["method"] in GOSSIP_METHODS else None
    period = c["period"] if c["method"] in ("local_sgd", "torchft_localsgd", "torchft_diloco") else None
    return (c["method"], r.get("world_size", c["workers"]), c["split"], p, topo, period, c["batch_size"])


def label(k: tuple) -> str:
    method, m, split, p, topo, period, b = k
    if method == "gossip":
        return f"gossip p={p:g}" + ("" if topo == "random" else f" {topo}")
    if method == "gossip_async":
        return f"asynchronous gossip p={p:g}" + ("" if topo == "random" else f" {topo}")
    if method == "lightning_gossip":
        return f"Lightning GossipStrategy p={p:g}"
    if method == "single":
        return f"1 worker, batch {b}"
    if method == "ddp":
        return f"DDP (torch) {m} x {b}"
    if method == "lightning_ddp":
        return f"Lightning DDP {m} x {b}"
    names = {"local_sgd": "torch PeriodicModelAverager (Local SGD)", "torchft_localsgd": "torchft LocalSGD",
             "torchft_diloco": "torchft DiLoCo"}
    return f"{names.get(method, method)} H={period}"


def ms(values: Iterable[Optional[float]], digits: int = 3) -> str:
    v = [x for x in values if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{digits}f}"
    return f"{statistics.mean(v):.{digits}f} ± {statistics.stdev(v):.{digits}f}"


def mean(values: Iterable[Optional[float]]) -> Optional[float]:
    v = [x for x in values if x is not None]
    return statistics.mean(v) if v else None


def group(results: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    out: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        out[key_of(r)].append(r)
    return out


def final_train_loss(r: dict[str, Any]) -> Optional[float]:
    curve = r.get("curve") or []
    return curve[-1]["train_loss"] if curve else None


def write_table(path: Path, header: list[str], rows: list[list[Any]], title: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([f"{title}\n"] if title else []) + ["| " + " | ".join(header) + " |",
                                                 "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    with open(path.with_suffix(".csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)


def _order(k: tuple) -> tuple:
    method, m, split, p, topo, period, b = k
    rank = {"single": 0, "ddp": 1, "lightning_ddp": 2, "gossip": 3, "gossip_async": 4, "lightning_gossip": 5,
            "local_sgd": 6, "torchft_localsgd": 7, "torchft_diloco": 8}.get(method, 9)
    return (m if method != "single" else b // 32, split, rank, p or 0, topo or "", period or 0)


# ---------------------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def band(ax, runs: list[dict[str, Any]], field: str, label_: str, x_field: str = "step", **kw) -> None:
    import numpy as np

    curves = [[(pt[x_field], pt[field]) for pt in r["curve"] if pt.get(field) is not None] for r in runs]
    curves = [c for c in curves if c]
    if not curves:
        return
    n = min(len(c) for c in curves)
    x = np.array([pt[0] for pt in curves[0][:n]], dtype=float)
    y = np.array([[pt[1] for pt in c[:n]] for c in curves], dtype=float)
    line, = ax.plot(x, y.mean(0), label=f"{label_} (n={len(curves)})", **kw)
    if len(curves) > 1:
        ax.fill_between(x, y.mean(0) - y.std(0, ddof=1), y.mean(0) + y.std(0, ddof=1), alpha=0.15,
                        color=line.get_color())


# ---------------------------------------------------------------------------------------------------------------------
# the sections
# ---------------------------------------------------------------------------------------------------------------------
def equivalence(runs: Path, out: Path, sweep: str = "equivalence") -> None:
    """Claim (1): the table and plots of one equivalence sweep (``equivalence_cnn`` for the CNN's runs)."""
    results = load(runs, sweep)
    if not results:
        return
    ylim = (0.8, 1.0) if sweep.endswith("_cnn") else (0.3, 0.85)
    g = group(results)
    rows = []
    for k in sorted(g, key=_order):
        rs = g[k]
        m = k[1] if k[0] != "single" else k[6] // 32
        rows.append([m, label(k), len(rs), ms(r["test_acc"] for r in rs), ms(r["test_loss"] for r in rs),
                     ms((final_train_loss(r) for r in rs)), ms((r["final_consensus_distance"] for r in rs), 2),
                     f"{mean(r['bytes_sent_per_worker'] for r in rs) / 1e6:.1f}",
                     f"{mean(r['train_time_s'] for r in rs):.1f}"])
    write_table(out / sweep / "table", ["M", "run", "seeds", "test acc (consensus)", "test loss",
                                                "train loss (last 100 steps)", "consensus distance (end)",
                                                "MB sent / worker", "train s / worker"], rows)
    plt = _plt()
    ms_ = sorted({k[1] if k[0] != "single" else k[6] // 32 for k in g})
    fig, axes = plt.subplots(2, len(ms_), figsize=(5.5 * len(ms_), 8), squeeze=False)
    for col, m in enumerate(ms_):
        keys = [k for k in sorted(g, key=_order) if (k[0] != "single" and k[1] == m)
                or (k[0] == "single" and k[6] == 32 * m)]
        for k in keys:
            style = {"ls": "--", "lw": 2} if k[0] in ("single", "ddp") else {}
            band(axes[0][col], g[k], "train_loss", label(k), **style)
            band(axes[1][col], g[k], "val_acc", label(k), **style)
        axes[0][col].set(title=f"M = {m}: training loss of the workers", xlabel="step", yscale="log")
        axes[1][col].set(title=f"M = {m}: validation accuracy of the consensus", xlabel="step", ylim=ylim)
        axes[1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / sweep / "curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m in ms_:
        ks = sorted([k for k in g if k[0] == "gossip" and k[1] == m], key=lambda k: k[3])
        xs = [max(k[3], 3e-3) for k in ks]
        ys = [mean(r["test_acc"] for r in g[k]) for k in ks]
        es = [statistics.stdev([r["test_acc"] for r in g[k]]) if len(g[k]) > 1 else 0 for k in ks]
        line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"gossip M={m}")
        for k in g:
            if (k[0] == "ddp" and k[1] == m) or (k[0] == "single" and k[6] == 32 * m):
                v = mean(r["test_acc"] for r in g[k])
                ax.axhline(v, ls="--" if k[0] == "ddp" else ":", color=line[0].get_color(), alpha=0.7,
                           label=f"{'DDP' if k[0] == 'ddp' else '1 worker'} M={m}")
    if any(k[0] == "gossip" for k in g):
        ax.set_xscale("log")
    ax.set(xlabel="gossip probability p (p = 0 drawn at 0.003)", ylabel="test accuracy (consensus)",
           title="Equivalence: final test accuracy against p")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / sweep / "accuracy_vs_p.png", dpi=110)
    plt.close(fig)


def equivalence_cnn(runs: Path, out: Path) -> None:
    equivalence(runs, out, "equivalence_cnn")


def exploration(runs: Path, out: Path, sweep: str = "exploration") -> None:
    """Claim (2): label-skewed runs beside the IID ones of the matching equivalence sweep (``exploration_cnn``: CNN)."""
    skewed = load(runs, sweep)
    if not skewed:
        return
    iid_sweep = sweep.replace("exploration", "equivalence")
    results = skewed + [r for r in load(runs, iid_sweep) if r["config"]["method"] != "single"]
    ylim = (0.5, 1.0) if sweep.endswith("_cnn") else (0.2, 0.85)
    g = group(results)
    rows = []
    for k in sorted(g, key=lambda k: (k[1], k[2], _order(k))):
        rs = g[k]
        if k[0] not in ("gossip", "ddp"):
            continue
        own_mean = [statistics.mean(r["own_test_acc"]) for r in rs]
        gap = [r["test_acc"] - statistics.mean(r["own_test_acc"]) for r in rs]
        rows.append([k[1], k[2], label(k), len(rs), ms(r["test_acc"] for r in rs), ms(own_mean),
                     f"{mean(min(r['own_test_acc']) for r in rs):.3f}-{mean(max(r['own_test_acc']) for r in rs):.3f}",
                     ms(gap), ms((r["final_consensus_distance"] for r in rs), 2)])
    write_table(out / sweep / "table", ["M", "split", "run", "seeds", "consensus test acc",
                                                "own models: mean", "own: min-max (mean over seeds)",
                                                "consensus - own mean", "consensus distance (end)"], rows)
    plt = _plt()
    ms_ = sorted({k[1] for k in g if k[2] == "label_skew"}) or sorted({k[1] for k in g})
    for m in ms_:
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        for row, split in enumerate(("iid", "label_skew")):
            for k in sorted([k for k in g if k[1] == m and k[2] == split and k[0] in ("gossip", "ddp")], key=_order):
                style = {"ls": "--", "lw": 2, "color": "red"} if k[0] == "ddp" else {}
                band(axes[row][0], g[k], "val_acc", label(k), **style)
                if k[0] == "gossip":
                    band(axes[row][1], g[k], "consensus_distance", label(k))
            # the workers' own models, for the smallest p > 0 (0.01 where it was run), as thin lines
            own = sorted([k for k in g if k[1] == m and k[2] == split and k[0] == "gossip" and k[3] > 0],
                         key=lambda k: k[3])
            for k in own[:1]:
                r = g[k][0]
                for i in range(len(r["curve"][0]["own_val_acc"])):
                    axes[row][0].plot([pt["step"] for pt in r["curve"]], [pt["own_val_acc"][i] for pt in r["curve"]],
                                      color="grey", lw=0.6, alpha=0.6,
                                      label=f"own models, p={k[3]:g}, seed 1" if i == 0 else None)
            axes[row][0].set(title=f"M={m} {split}: validation accuracy (consensus; grey: own models)",
                             xlabel="step", ylim=ylim)
            axes[row][1].set(title=f"M={m} {split}: consensus distance", xlabel="step", yscale="log")
            axes[row][0].legend(fontsize=6)
            axes[row][1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / sweep / f"local_vs_consensus_M{m}.png", dpi=110)
        plt.close(fig)


def exploration_cnn(runs: Path, out: Path) -> None:
    exploration(runs, out, "exploration_cnn")


def topology(runs: Path, out: Path) -> None:
    results = load(runs, "topology")
    if not results:
        return
    g = group(results)
    rows = []
    for k in sorted(g, key=lambda k: (k[1], k[2], k[3], k[4])):
        rs = g[k]
        rows.append([k[1], k[2], f"{k[3]:g}", k[4], len(rs), ms(r["test_acc"] for r in rs),
                     ms(statistics.mean(r["own_test_acc"]) for r in rs),
                     ms((r["final_consensus_distance"] for r in rs), 2),
                     ms((mean(pt["consensus_distance"] for pt in r["curve"]) for r in rs), 2)])
    write_table(out / "topology" / "table", ["M", "split", "p", "topology", "seeds", "consensus test acc",
                                             "own models test acc (mean)", "consensus distance (end)",
                                             "consensus distance (mean over training)"], rows)
    plt = _plt()
    splits = sorted({k[2] for k in g})
    fig, axes = plt.subplots(2, len(splits), figsize=(6 * len(splits), 8), squeeze=False)
    for col, split in enumerate(splits):
        for k in sorted([k for k in g if k[2] == split], key=lambda k: (k[3], k[4])):
            band(axes[0][col], g[k], "consensus_distance", f"{k[4]} p={k[3]:g}")
            band(axes[1][col], g[k], "val_acc", f"{k[4]} p={k[3]:g}")
        m = sorted({k[1] for k in g})
        axes[0][col].set(title=f"M={m} {split}: consensus distance", xlabel="step", yscale="log")
        axes[1][col].set(title=f"M={m} {split}: validation accuracy (consensus)", xlabel="step", ylim=(0.2, 0.85))
        axes[0][col].legend(fontsize=7)
        axes[1][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "topology" / "topologies.png", dpi=110)
    plt.close(fig)


def _val_acc_within(r: dict[str, Any], field: str, limit: float) -> Optional[float]:
    """Validation accuracy of the consensus at the last evaluation whose ``field`` (bytes sent per worker, training
    seconds) was still within ``limit``."""
    best = None
    for pt in r.get("curve") or []:
        if pt[field] <= limit * 1.0001:
            best = pt["val_acc"]
    return best


def peers(runs: Path, out: Path, sweep: str = "peers") -> None:
    """The independent libraries beside gossip and DDP of the matching equivalence sweep (``peers_cnn``: CNN)."""
    results = load(runs, sweep)
    if not results:
        return
    ylim = (0.5, 1.0) if sweep.endswith("_cnn") else (0.3, 0.85)
    ms_ = sorted({r["world_size"] for r in results})
    extra = [r for r in load(runs, sweep.replace("peers", "equivalence"))
             if r["config"]["method"] in ("gossip", "ddp") and r["world_size"] in ms_ and r["config"]["p"] in
             (0.0, 0.1, 1.0) or (r["config"]["method"] == "ddp" and r["world_size"] in ms_)]
    g = group(results + extra)
    rows = []
    for m in ms_:
        ls_ = [r for r in results if r["config"]["method"] == "local_sgd" and r["world_size"] == m]
        budget = mean(r["bytes_sent_per_worker"] for r in ls_) if ls_ else None
        for k in sorted([k for k in g if k[1] == m], key=_order):
            rs = g[k]
            wall = [r.get("train_time_s") for r in rs] if "curve" in rs[0] else [r.get("runtime_s") for r in rs]
            at_budget = "-"
            if budget and "curve" in rs[0]:
                at_budget = ms(_val_acc_within(r, "bytes_sent_per_worker", budget) for r in rs)
            rows.append([m, label(k), len(rs), ms(r["test_acc"] for r in rs), at_budget,
                         f"{mean(r['bytes_sent_per_worker'] for r in rs) / 1e6:.2f}",
                         ms(wall, 1), "hand loop" if "curve" in rs[0] else "python -m lightning_gossip.train"])
    write_table(out / sweep / "table", ["M", "run", "seeds", "test acc at equal steps (1500)",
                                          "val acc at equal bytes (Local SGD H=8's total)", "MB sent / worker",
                                          "wall s (train steps; Lightning: whole fit+test)", "path"], rows)
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for k in sorted([k for k in g if "curve" in g[k][0]], key=_order):
        band(axes[0], g[k], "val_acc", label(k))
        band(axes[1], g[k], "val_acc", label(k), x_field="bytes_sent_per_worker")
    axes[0].set(title="validation accuracy of the consensus at equal steps", xlabel="step", ylim=ylim)
    axes[1].set(title="... at equal bytes sent per worker", xlabel="bytes sent per worker", xscale="log", ylim=ylim)
    axes[0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / sweep / "peers.png", dpi=110)
    plt.close(fig)


def peers_cnn(runs: Path, out: Path) -> None:
    peers(runs, out, "peers_cnn")


def asynchronous(runs: Path, out: Path) -> None:
    """The asynchronous mode beside the lock-step one (the ``equivalence`` runs) at the same M, p and seeds."""
    results = load(runs, "asynchronous")
    if not results:
        return
    before = load(runs, "asynchronous_max16")  # the same runs with up to 16 pushes of a rank in flight
    cells = {(r["world_size"], r["config"]["p"]) for r in results}
    lock_step = [r for r in load(runs, "equivalence")
                 if r["config"]["method"] == "gossip" and (r["world_size"], r["config"]["p"]) in cells]
    rows = []
    for m, p in sorted(cells):
        pick = [r for r in results if (r["world_size"], r["config"]["p"]) == (m, p)]
        old = [r for r in before if (r["world_size"], r["config"]["p"]) == (m, p)]
        ref = [r for r in lock_step if (r["world_size"], r["config"]["p"]) == (m, p)]
        async_time = mean(r["train_time_s"] for r in pick)
        for name, rs in (("lock-step", ref), ("asynchronous", pick), ("asynchronous, 16 in flight", old)):
            if not rs:
                continue
            sent = [r["gossip_counters"]["messages_sent"] / r["config"]["steps"] for r in rs]
            skipped = [(r.get("sends_skipped") or (r["gossip_counters"] or {}).get("sends_skipped") or 0)
                       / r["config"]["steps"] for r in rs]
            at_time = ms(_val_acc_within(r, "train_time_s", async_time) for r in rs)
            rows.append([m, f"{p:g}", name, len(rs), ms(r["test_acc"] for r in rs),
                         ms(statistics.mean(r["own_test_acc"]) for r in rs), ms(sent, 3), ms(skipped, 3),
                         ms((r["final_consensus_distance"] for r in rs), 2), ms((r["train_time_s"] for r in rs), 1),
                         at_time])
    write_table(out / "asynchronous" / "table", [
        "M", "p", "mode", "seeds", "consensus test acc (1500 steps)", "own models test acc (mean)",
        "pushes sent / worker / step", "coins skipped / worker / step", "consensus distance (end)",
        "train s / worker", "val acc after the asynchronous run's train s / worker"], rows)
    plt = _plt()
    ms_ = sorted({m for m, _ in cells})
    fig, axes = plt.subplots(2, len(ms_), figsize=(6 * len(ms_), 8), squeeze=False)
    for col, m in enumerate(ms_):
        for p in sorted({p for mm, p in cells if mm == m}):
            for name, rs, style in (("lock-step", lock_step, "-"), ("async", results, "--")):
                sel = [r for r in rs if (r["world_size"], r["config"]["p"]) == (m, p)]
                band(axes[0][col], sel, "val_acc", f"{name} p={p:g}", linestyle=style)
                band(axes[1][col], sel, "val_acc", f"{name} p={p:g}", x_field="train_time_s", linestyle=style)
        axes[0][col].set(title=f"M={m}: validation accuracy (consensus) at equal steps", xlabel="step",
                         ylim=(0.2, 0.85))
        axes[1][col].set(title=f"M={m}: ... against train seconds per worker", xlabel="train s / worker",
                         ylim=(0.2, 0.85))
        axes[0][col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "asynchronous" / "asynchronous.png", dpi=110)
    plt.close(fig)


OUTER_METHODS = ("gossip_outer", "torchft_diloco")
TUNING_SEEDS = (1, 2)  # the outer sweep's settings are chosen on these seeds (seed 3 is run for the chosen ones)


def outer_key(r: dict[str, Any]) -> tuple:
    """(M, method, H, outer lr, outer momentum, Nesterov, inner p) of an outer-sweep run (old runs: DiLoCo's 0.7/0.9)."""
    c = r["config"]
    return (r["world_size"], c["method"], c["period"], c.get("outer_lr", 0.7), c.get("outer_momentum", 0.9),
            c.get("outer_nesterov", 1), c["p"] if c["method"].startswith("gossip_outer") else None)


def outer_label(k: tuple) -> str:
    m, method, period, lr, mom, nesterov, p = k
    name = {"gossip_outer": "outer-momentum gossip", "torchft_diloco": "torchft DiLoCo"}[method]
    extra = "" if (mom, nesterov) == (0.9, 1) else f", momentum {mom:g}{'' if nesterov else ' heavy-ball'}"
    inner = f", p={p:g}" if p else ""
    return f"{name} H={period} lr={lr:g}{extra}{inner}"


def outer(runs: Path, out: Path, sweep: str = "outer") -> None:
    """Issue 18: the outer-momentum gossip and torchft's DiLoCo on the same tuning grid, then the chosen settings
    beside Local SGD, torchft LocalSGD, DDP and plain gossip (the runs of the ``peers`` and ``equivalence`` sweeps)."""
    results = [r for r in load(runs, sweep) if r["config"]["method"] in OUTER_METHODS]
    if not results:
        return
    cnn = sweep.endswith("_cnn")
    ylim = (0.5, 1.0) if cnn else (0.3, 0.85)
    peers_runs = load(runs, "peers_cnn" if cnn else "peers")
    equivalence_runs = load(runs, "equivalence_cnn" if cnn else "equivalence")
    ms_ = sorted({r["world_size"] for r in results})
    budgets = {m: mean(r["bytes_sent_per_worker"] for r in peers_runs
                       if r["config"]["method"] == "local_sgd" and r["world_size"] == m) for m in ms_}
    g: dict[tuple, list] = defaultdict(list)
    for r in results:
        g[outer_key(r)].append(r)

    def tuning_score(k: tuple) -> Optional[float]:
        return mean(r["test_acc"] for r in g[k] if r["config"]["seed"] in TUNING_SEEDS)

    rows = []
    for k in sorted(g, key=lambda k: (k[0], k[1], k[2], k[3], k[4], k[5], k[6] or 0)):
        rs = g[k]
        at_budget = ms(_val_acc_within(r, "bytes_sent_per_worker", budgets[k[0]]) for r in rs) if budgets[k[0]] else "-"
        rows.append([k[0], outer_label(k), ",".join(str(r["config"]["seed"]) for r in rs),
                     ms(r["test_acc"] for r in rs), f"{tuning_score(k):.3f}", at_budget,
                     f"{mean(r['bytes_sent_per_worker'] for r in rs) / 1e6:.1f}",
                     ms((r["final_consensus_distance"] for r in rs), 2)])
    write_table(out / sweep / "tuning", ["M", "run", "seeds", "test acc (1500 steps)",
                                         "mean test acc over the tuning seeds 1, 2",
                                         "val acc at Local SGD H=8's bytes", "MB sent / worker",
                                         "consensus distance (end)"], rows)

    # the chosen setting of each method at each M (best mean test accuracy over the tuning seeds), beside the peers
    best = {}
    for m in ms_:
        for method in OUTER_METHODS:
            cands = [k for k in g if k[0] == m and k[1] == method and tuning_score(k) is not None]
            if cands:
                best[(m, method)] = max(cands, key=tuning_score)
    reference = [r for r in peers_runs + equivalence_runs if r["world_size"] in ms_ and (
        r["config"]["method"] in ("local_sgd", "torchft_localsgd", "ddp")
        or (r["config"]["method"] == "torchft_diloco" and r["config"]["period"] == 8)
        or (r["config"]["method"] == "gossip" and (r["config"]["p"] == 1.0 or r in peers_runs)))]
    ref_groups = group(reference)
    rows = []
    for m in ms_:
        lines = []
        for k in sorted([k for k in ref_groups if k[1] == m], key=_order):
            tag = " (DiLoCo paper's setting, `peers` sweep)" if k[0] == "torchft_diloco" else ""
            lines.append((label(k) + tag, ref_groups[k]))
        for method in OUTER_METHODS:
            if (m, method) in best:
                lines.append((outer_label(best[(m, method)]) + " (chosen)", g[best[(m, method)]]))
        for name, rs in lines:
            at_budget = ms(_val_acc_within(r, "bytes_sent_per_worker", budgets[m]) for r in rs) if budgets[m] else "-"
            rows.append([m, name, len(rs), ms(r["test_acc"] for r in rs), at_budget,
                         f"{mean(r['bytes_sent_per_worker'] for r in rs) / 1e6:.1f}",
                         ms(statistics.mean(r["own_test_acc"]) for r in rs)])
    write_table(out / sweep / "summary", ["M", "run", "seeds", "test acc at equal steps (1500)",
                                          "val acc at equal bytes (Local SGD H=8's total)", "MB sent / worker",
                                          "own models test acc (mean)"], rows)

    # the order first implemented (each pair averages its models, then the outer step: NoLoCo's) against the order
    # used now (the outer step, then each pair averages the new slow weights), at the same settings and seeds
    first = defaultdict(list)
    for r in load(runs, sweep.replace("outer", "outer_mix_first")):
        first[outer_key(r)].append(r)
    rows = []
    for k in sorted(first, key=lambda k: (k[0], k[2], k[3])):
        now = {r["config"]["seed"]: r["test_acc"] for r in g.get(k, [])}
        then = {r["config"]["seed"]: r["test_acc"] for r in first[k]}
        seeds = sorted(set(now) & set(then))
        rows.append([k[0], k[2], f"{k[3]:g}", ",".join(map(str, seeds)) or "-", ms(then[s_] for s_ in seeds),
                     ms(now[s_] for s_ in seeds)])
    if rows:
        write_table(out / sweep / "order", ["M", "H", "outer lr", "seeds (both)",
                                            "mix, then outer step (first; NoLoCo's order)",
                                            "outer step, then mix (now)"], rows)

    plt = _plt()
    fig, axes = plt.subplots(1, len(ms_), figsize=(5.5 * len(ms_), 4.2), squeeze=False)
    for col, m in enumerate(ms_):
        ax = axes[0][col]
        for method, marker in (("gossip_outer", "o"), ("torchft_diloco", "s")):
            for period, style in ((8, "-"), (32, "--")):
                ks = sorted([k for k in g if k[0] == m and k[1] == method and k[2] == period
                             and (k[4], k[5], k[6] or 0) == (0.9, 1, 0)], key=lambda k: k[3])
                if ks:
                    ax.errorbar([k[3] for k in ks], [mean(r["test_acc"] for r in g[k]) for k in ks],
                                yerr=[statistics.stdev([r["test_acc"] for r in g[k]]) if len(g[k]) > 1 else 0
                                      for k in ks], marker=marker, ls=style, capsize=3,
                                label=f"{outer_label(ks[0]).split(' H=')[0]} H={period}")
        for k in ref_groups:
            if k[1] == m and k[0] == "local_sgd":
                ax.axhline(mean(r["test_acc"] for r in ref_groups[k]), color="grey", ls=":", label="Local SGD H=8")
        ax.set(title=f"M = {m}: test accuracy against the outer lr", xlabel="outer learning rate", xscale="log",
               ylim=(0.5, 1.0) if cnn else (0.55, 0.85))
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / sweep / "tuning.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(ms_), figsize=(5.5 * len(ms_), 8), squeeze=False)
    for col, m in enumerate(ms_):
        for k in sorted([k for k in ref_groups if k[1] == m and "curve" in ref_groups[k][0]], key=_order):
            band(axes[0][col], ref_groups[k], "val_acc", label(k), lw=1)
            band(axes[1][col], ref_groups[k], "val_acc", label(k), x_field="bytes_sent_per_worker", lw=1)
        for method in OUTER_METHODS:
            if (m, method) in best:
                k = best[(m, method)]
                band(axes[0][col], g[k], "val_acc", outer_label(k), lw=2.5)
                band(axes[1][col], g[k], "val_acc", outer_label(k), x_field="bytes_sent_per_worker", lw=2.5)
        axes[0][col].set(title=f"M = {m}: validation accuracy of the consensus", xlabel="step", ylim=ylim)
        axes[1][col].set(title=f"M = {m}: ... against bytes sent per worker", xlabel="bytes sent per worker",
                         xscale="log", ylim=ylim)
        axes[0][col].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / sweep / "curves.png", dpi=110)
    plt.close(fig)


def outer_cnn(runs: Path, out: Path) -> None:
    outer(runs, out, "outer_cnn")


def outer_async(runs: Path, out: Path) -> None:
    """The outer-momentum gossip asynchronously against lock-step, same M, H, outer lr and seeds (equal steps)."""
    lockstep = defaultdict(dict)
    for r in load(runs, "outer"):
        c = r["config"]
        if c["method"] == "gossip_outer":
            lockstep[(r["world_size"], c["period"], c["outer_lr"], c["p"])][c["seed"]] = r["test_acc"]
    asynchronous = defaultdict(dict)
    for r in load(runs, "outer_async"):
        c = r["config"]
        asynchronous[(r["world_size"], c["period"], c["outer_lr"], c["p"])][c["seed"]] = r["test_acc"]
    rows = []
    for k in sorted(asynchronous):
        seeds = sorted(set(asynchronous[k]) & set(lockstep.get(k, {})))
        rows.append([k[0], k[1], f"{k[2]:g}", f"{k[3]:g}", ",".join(map(str, seeds)) or "-",
                     ms(lockstep[k][s_] for s_ in seeds), ms(asynchronous[k][s_] for s_ in seeds)])
    if rows:
        write_table(out / "outer" / "async", ["M", "H", "outer lr", "p", "seeds (both)",
                                              "lock-step test acc (1500 steps)", "asynchronous test acc (1500 steps)"],
                    rows)


def scale(runs: Path, out: Path) -> None:
    """Start-up time and peak RSS per worker of the hand-loop gossip runs, by number of worker processes."""
    results = [r for sweep in ("equivalence", "exploration", "topology") for r in load(runs, sweep)
               if r["config"]["method"] == "gossip"]
    lightning = [r for r in load(runs, "peers") if r["config"]["method"].startswith("lightning")]
    if not results:
        return
    by_m: dict[int, list] = defaultdict(list)
    for r in results:
        by_m[r["world_size"]].append(r)
    rows = []
    for m in sorted(by_m):
        rs = by_m[m]
        rows.append([m, len(rs), ms((max(r["startup_s"]) for r in rs), 1),
                     ms((statistics.mean(r["peak_rss_mb"]) for r in rs), 0),
                     ms((max(r["peak_rss_mb"]) for r in rs), 0), ms((r["train_time_s"] for r in rs), 1),
                     ms((r.get("launch_wall_s") for r in rs), 1)])
    write_table(out / "scale" / "processes", ["worker processes", "runs", "start-up s (launch to first step)",
                                              "peak RSS MB per worker (mean)", "peak RSS MB (max worker)",
                                              "train s / worker (1500 steps)", "whole run s (launch to exit)"], rows)
    if lightning:
        rows = [[r["world_size"], label(key_of(r)), f"{r['runtime_s']:.1f}", f"{r['launch_wall_s']:.1f}"]
                for r in lightning]
        write_table(out / "scale" / "lightning", ["M", "run", "fit+test s (results.json runtime_s)",
                                                  "whole command s"], rows)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default=str(RUNS))
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--only", default=None, help="comma-separated section names (default: all)")
    args = parser.parse_args()
    runs, out = Path(args.runs), Path(args.out)
    sections = (equivalence, equivalence_cnn, exploration, exploration_cnn, topology, peers, peers_cnn, asynchronous,
                outer, outer_cnn, outer_async, scale)
    if args.only:
        sections = tuple(s for s in sections if s.__name__ in args.only.split(","))
    for section in sections:
        section(runs, out)
        print(f"{section.__name__}: done", flush=True)


if __name__ == "__main__":
    main()
