"""Claim (b): gossip explores like dropout over whole models; its consensus beats the workers' own models.

    python -m experiments.claims.exploration                  # run the sweeps (about 25 min on 2 busy cores), report
    python -m experiments.claims.exploration --report-only

On scikit-learn's digits with the MLP (conf/experiment/claims_exploration.yaml): 4 workers x batch 16, 20 epochs,
on IID shards and on label-skewed shards (Dirichlet alpha=0.3 per class). For every run, LocalModelEval evaluates
each worker's own model on the whole validation set every epoch and on the test set at the end of training (before
the final consensus), next to the consensus model that validation/test see. Compared against DDP on the same shards.

Writes into --out (default experiments/results/claims/exploration): local_vs_consensus.png, consensus_distance.png,
accuracy_vs_p.png, table.md, table.csv, commands.sh. The runs go to logs/claims/exploration/ (not committed).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Optional

from experiments.claims.common import REPO, cfg_get, fmt, jobs, markdown, mean_std, pyplot, run_sweep, write_csv

SPLITS = ("iid", "label_skew")
P_RANDOM = (0.0, 0.01, 0.1, 0.5)
P_TOPOLOGY = (0.01, 0.1)


def sweeps(seeds: str) -> dict[str, list[str]]:
    base = ["experiment=claims_exploration", f"seed={seeds}", "data.split=iid,label_skew"]
    return {
        "random": [*base, "strategy.topology=random", "strategy.p=" + ",".join(f"{p:g}" for p in P_RANDOM)],
        "topology": [*base, "strategy.topology=ring,exponential",
                     "strategy.p=" + ",".join(f"{p:g}" for p in P_TOPOLOGY)],
        "ddp": [*base, "strategy=ddp"],
    }


def key(r: dict[str, Any]) -> tuple:
    if not r.get("gossip"):
        return (cfg_get(r, "data.split"), "ddp", None)
    return (cfg_get(r, "data.split"), cfg_get(r, "strategy.topology"), float(cfg_get(r, "strategy.p")))


def local_test(r: dict[str, Any]) -> list[float]:
    return (r.get("local") or {}).get("local_test_acc", [])


def find(results: list[dict[str, Any]], split: str, topology: str, p: Optional[float]) -> list[dict[str, Any]]:
    return [r for r in results if key(r) == (split, topology, p)]


def report(root: Path, out: Path) -> None:
    results = [r for name in ("random", "topology", "ddp") for r in jobs(root / name)]
    if not results:
        raise SystemExit(f"no finished runs under {root}")
    plt = pyplot()

    # -- 1. consensus vs each worker's own model vs DDP, validation accuracy per epoch ------------------------------
    ps = [p for p in P_RANDOM if p > 0]
    fig, axes = plt.subplots(len(SPLITS), len(ps), figsize=(5.2 * len(ps), 4.0 * len(SPLITS)), squeeze=False)
    for i, split in enumerate(SPLITS):
        ddp = sorted(find(results, split, "ddp", None), key=lambda r: r.get("seed", 0))
        for j, p in enumerate(ps):
            ax = axes[i][j]
            runs = sorted(find(results, split, "random", p), key=lambda r: r.get("seed", 0))
            if runs:
                c = runs[0]["curves"]
                ranks = sorted(k for k in c if k.startswith("local/acc_rank"))
                for n, k in enumerate(ranks):
                    xs = sorted(c[k])
                    ax.plot([x + 1 for x in xs], [c[k][x] for x in xs], color="0.6", lw=0.9,
                            label="each worker's own model" if n == 0 else None)
                xs = sorted(c.get("val/acc", {}))
                ax.plot([x + 1 for x in xs], [c["val/acc"][x] for x in xs], color="tab:blue", lw=2.2,
                        label="consensus model")
            if ddp:
                c = ddp[0]["curves"]
                xs = sorted(c.get("val/acc", {}))
                ax.plot([x + 1 for x in xs], [c["val/acc"][x] for x in xs], color="tab:red", ls="--", lw=1.6,
                        label="DDP")
            ax.set_title(f"{split}, p={p:g} (random peer)", fontsize=10)
            ax.set_ylim(0.0 if split == "label_skew" else 0.5, 1.0)
            ax.set_xlabel("epoch")
            ax.set_ylabel("validation accuracy")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Exploration on digits (MLP, 4 workers x 16): consensus vs the workers' own models vs DDP "
                 f"(seed {runs[0].get('seed') if runs else '?'})")
    fig.tight_layout()
    fig.savefig(out / "local_vs_consensus.png", dpi=100)
    plt.close(fig)

    # -- 2. consensus distance over training --------------------------------------------------------------------------
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(12, 4.2), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for i, split in enumerate(SPLITS):
        ax = axes[0][i]
        for r in sorted((r for r in results if r.get("gossip") and cfg_get(r, "data.split") == split), key=key):
            _, topology, p = key(r)
            c = r["curves"].get("gossip/consensus_distance", {})
            if not c:
                continue
            xs = sorted(c)
            ls = {"random": "-", "ring": "--", "exponential": ":"}[topology]
            color = cmap({0.0: 0.0, 0.01: 0.3, 0.1: 0.6, 0.5: 0.9}.get(p, 0.5))
            ax.plot([x + 1 for x in xs], [max(c[x], 1e-12) for x in xs], ls=ls, color=color,
                    label=f"{topology}, p={p:g}")
        ax.set_yscale("log")
        ax.set_title(f"consensus distance (1/M) Σ‖x_i − x̄‖², {split}", fontsize=10)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "consensus_distance.png", dpi=110)
    plt.close(fig)

    # -- 3. final test accuracy against p and topology ----------------------------------------------------------------
    all_ps = sorted({key(r)[2] for r in results if r.get("gossip")})
    fig, axes = plt.subplots(1, len(SPLITS), figsize=(12, 4.2), squeeze=False)
    for i, split in enumerate(SPLITS):
        ax = axes[0][i]
        for topology, marker in (("random", "o"), ("ring", "s"), ("exponential", "^")):
            pts = [(all_ps.index(p), mean_std(r["metrics"]["test/acc"] for r in find(results, split, topology, p)))
                   for p in all_ps if find(results, split, topology, p)]
            if pts:
                ax.plot([x for x, _ in pts], [m for _, (m, _, _) in pts], marker=marker, label=f"consensus, {topology}")
        pts = [(all_ps.index(p), [a for r in find(results, split, "random", p) for a in local_test(r)]) for p in all_ps]
        pts = [(x, accs) for x, accs in pts if accs]
        if pts:
            ax.plot([x for x, _ in pts], [sum(a) / len(a) for _, a in pts], color="0.4", ls="--", marker=".",
                    label="workers' own models: mean (random)")
            ax.fill_between([x for x, _ in pts], [min(a) for _, a in pts], [max(a) for _, a in pts], color="0.6",
                            alpha=0.2, label="workers' own models: min-max")
        ddp = find(results, split, "ddp", None)
        if ddp:
            ax.axhline(mean_std(r["metrics"]["test/acc"] for r in ddp)[0], color="tab:red", ls="--", label="DDP")
        ax.set_xticks(range(len(all_ps)))
        ax.set_xticklabels([f"{p:g}" for p in all_ps])
        ax.set_xlabel("gossip probability p")
        ax.set_ylabel("test accuracy after 20 epochs")
        ax.set_title(f"{split}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_p.png", dpi=110)
    plt.close(fig)

    # -- table --------------------------------------------------------------------------------------------------------
    rows = []
    for split in SPLITS:
        for k in sorted({key(r) for r in results if key(r)[0] == split},
                        key=lambda k: (k[1] != "ddp", k[1], -1 if k[2] is None else k[2])):
            runs = find(results, *k)
            locals_ = [a for r in runs for a in local_test(r)]
            consensus = mean_std(r["metrics"].get("test/acc") for r in runs)
            local_mean = mean_std(locals_)
            rows.append({
                "split": split,
                "strategy": "DDP" if k[1] == "ddp" else f"gossip {k[1]}",
                "p": "" if k[2] is None else f"{k[2]:g}",
                "n": len(runs),
                "consensus test acc": fmt(*consensus),
                "workers' own: mean": fmt(*local_mean) if locals_ else "n/a",
                "min": f"{min(locals_):.3f}" if locals_ else "n/a",
                "max": f"{max(locals_):.3f}" if locals_ else "n/a",
                "consensus - mean own": f"{consensus[0] - local_mean[0]:+.3f}" if locals_ else "n/a",
                "consensus distance (last epoch)": fmt(*mean_std(r["metrics"].get("gossip/consensus_distance")
                                                                  for r in runs), digits=4),
                "runtime s": fmt(*mean_std(r["runtime_s"] for r in runs), digits=0),
            })
    cols = list(rows[0])
    write_csv(rows, cols, out / "table.csv")
    (out / "table.md").write_text(markdown(rows, cols) + "\n")
    print((out / "table.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/claims/exploration")
    parser.add_argument("--runs", type=Path, default=REPO / "logs/claims/exploration")
    parser.add_argument("--seeds", default="1,2")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--force", action="store_true", help="rerun sweeps that finished before")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    commands = args.out / "commands.sh"
    if not args.report_only:
        commands.write_text("# the Hydra multiruns behind these results (run from the repository root)\n")
        for name, overrides in sweeps(args.seeds).items():
            run_sweep(name, overrides, args.runs, commands, force=args.force)
    report(args.runs, args.out)


if __name__ == "__main__":
    main()
