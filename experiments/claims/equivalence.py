"""Claim (a): gossip with M workers and batch b behaves like SGD with batch M*b.

    python -m experiments.claims.equivalence                  # run the sweeps (about 15 min on 2 busy cores), report
    python -m experiments.claims.equivalence --report-only    # rebuild tables and plots from finished sweeps

On scikit-learn's digits with the MLP (conf/experiment/claims_equivalence.yaml): gossip with M=4 workers and batch
b=16 for several p, against one worker with batch M*b=64 and against DDP with 4 x 16. Same epochs (30), same
learning rate (0.05, momentum 0.9) everywhere: the consensus of M workers that each take a step of size eta on b
samples moves, in expectation, like one worker taking a step of size eta on M*b samples, so no learning-rate scaling
is needed between the three (and each run takes the same 20 steps per epoch).

Writes into --out (default experiments/results/claims/equivalence): curves.png, table.md, table.csv, accuracy_vs_p.png
and commands.sh. The runs themselves go to logs/claims/equivalence/ (not committed).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from experiments.claims.common import REPO, cfg_get, fmt, jobs, markdown, mean_curve, mean_std, pyplot, run_sweep, \
    write_csv

P_VALUES = "0,0.01,0.1,0.5,1"
M, B = 4, 16


def sweeps(seeds: str) -> dict[str, list[str]]:
    base = ["experiment=claims_equivalence", f"seed={seeds}"]
    return {
        "gossip": [*base, f"strategy.p={P_VALUES}"],
        "ddp": [*base, "strategy=ddp"],
        "single": [*base, "strategy=single", f"data.batch_size={M * B}"],
    }


def label(result: dict[str, Any]) -> str:
    if result["strategy"] == "SingleDeviceStrategy":
        return f"1 worker, batch {cfg_get(result, 'data.batch_size')}"
    if result["strategy"] == "DDPStrategy":
        return f"DDP {result['world_size']}x{cfg_get(result, 'data.batch_size')}"
    return f"gossip {result['world_size']}x{cfg_get(result, 'data.batch_size')}, p={cfg_get(result, 'strategy.p'):g}"


def group(results: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        out.setdefault(label(r), []).append(r)
    return out


def messages_per_step(runs: list[dict[str, Any]]) -> str:
    if runs[0]["strategy"] == "DDPStrategy":
        return "all-reduce every step"
    if not runs[0].get("gossip"):
        return "-"
    return fmt(*mean_std((r.get("gossip_counters") or {}).get("messages_sent", 0) / r["global_step"] for r in runs))


def report(root: Path, out: Path) -> None:
    results = [r for name in ("single", "ddp", "gossip") for r in jobs(root / name)]
    if not results:
        raise SystemExit(f"no finished runs under {root}")
    groups = group(results)
    plt = pyplot()

    # -- curves: val acc / val loss of the evaluated model (consensus for gossip), train loss -------------------------
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    cmap = plt.get_cmap("viridis")
    gossip_labels = [k for k in groups if k.startswith("gossip")]
    for name, runs in groups.items():
        if name.startswith("gossip"):
            style = {"color": cmap(gossip_labels.index(name) / max(1, len(gossip_labels) - 1) * 0.9), "lw": 1.4}
        elif name.startswith("DDP"):
            style = {"color": "tab:red", "lw": 2.2, "ls": "--"}
        else:
            style = {"color": "black", "lw": 2.2, "ls": ":"}
        for ax, metric in zip(axes, ("val/acc", "val/loss", "train/loss")):
            epochs, mean, std = mean_curve(runs, metric)
            if not epochs:
                continue
            x = [e + 1 for e in epochs]
            ax.plot(x, mean, label=f"{name} (n={len(runs)})", **style)
            ax.fill_between(x, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=style["color"], alpha=0.12)
    titles = {"val/acc": "validation accuracy (gossip: consensus model)",
              "val/loss": "validation loss (gossip: consensus model)",
              "train/loss": "training loss (gossip: workers' own models, own batches)"}
    for ax, metric in zip(axes, titles):
        ax.set_title(titles[metric], fontsize=10)
        ax.set_xlabel("epoch (20 optimizer steps each, for every run)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0].set_ylim(0.5, 1.0)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle(f"Equivalence on digits (MLP): gossip M={M} x b={B} vs 1 worker x {M * B} vs DDP; "
                 "same lr, same epochs")
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)

    # -- table ---------------------------------------------------------------------------------------------------------
    rows = []
    for name, runs in groups.items():
        steps = runs[0]["global_step"]
        row = {
            "run": name,
            "n seeds": len(runs),
            "steps/worker": steps,
            "test acc": fmt(*mean_std(r["metrics"].get("test/acc") for r in runs)),
            "test loss": fmt(*mean_std(r["metrics"].get("test/loss") for r in runs)),
            "best val acc": fmt(*mean_std(r["metrics"].get("val/acc_best") for r in runs)),
            "final train loss": fmt(*mean_std(r["metrics"].get("train/loss") for r in runs)),
            "consensus distance (last epoch)": fmt(*mean_std(r["metrics"].get("gossip/consensus_distance")
                                                              for r in runs), digits=4),
            "messages/step (rank 0)": messages_per_step(runs),
            "runtime s": fmt(*mean_std(r["runtime_s"] for r in runs), digits=0),
        }
        rows.append(row)
    cols = list(rows[0])
    write_csv(rows, cols, out / "table.csv")
    (out / "table.md").write_text(markdown(rows, cols) + "\n")

    # -- accuracy vs p, with the two baselines as horizontal bands --------------------------------------------------
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ps = sorted({cfg_get(r, "strategy.p") for r in results if r.get("gossip")})
    stats = [mean_std(r["metrics"]["test/acc"] for r in results if r.get("gossip") and cfg_get(r, "strategy.p") == p)
             for p in ps]
    xs = list(range(len(ps)))
    ax.errorbar(xs, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", capsize=3,
                label=f"gossip consensus, {M}x{B}")
    for name, color, ls in ((f"1 worker, batch {M * B}", "black", ":"), (f"DDP {M}x{B}", "tab:red", "--")):
        if name in groups:
            m, s, _ = mean_std(r["metrics"]["test/acc"] for r in groups[name])
            ax.axhline(m, color=color, ls=ls, label=name)
            ax.axhspan(m - s, m + s, color=color, alpha=0.08)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{p:g}" for p in ps])
    ax.set_xlabel("gossip probability p")
    ax.set_ylabel("test accuracy after 30 epochs")
    ax.set_title("Equivalence: final test accuracy vs p (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_p.png", dpi=110)
    plt.close(fig)
    print((out / "table.md").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "experiments/results/claims/equivalence")
    parser.add_argument("--runs", type=Path, default=REPO / "logs/claims/equivalence")
    parser.add_argument("--seeds", default="1,2,3")
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
