"""Surviving a lost peer against the restart path, through Fabric and the survival launcher (issue 20, item 6).

Three scenarios per seed, the same Fabric loop (scikit-learn's digits, a 64-32-10 MLP, SGD lr 0.1 momentum 0.9,
batch 16, asynchronous gossip p = 0.5 with shared work, ``fabric.save`` after every epoch), 4 CPU workers started by
``python -m lightning_gossip.gossip.launch``:

- ``no_fault``: nobody is killed;
- ``survive``: ``on_peer_loss="continue"``; rank 2 SIGKILLs itself at its step ``--kill-step``; the survivors finish;
- ``restart``: ``on_peer_loss="fail"`` (the default); rank 2 SIGKILLs itself at the same step, the others stop naming
  it, and 4 fresh workers resume from the last epoch's checkpoint (what ``max_restarts=1`` does with torchrun's agent:
  every worker restarted, the work since that checkpoint redone).

Reported: wall time from the first launch to the end (both launches for ``restart``), the test accuracy of the final
consensus, and for ``survive`` the time from the kill to each survivor's next completed step.

    python experiments/reliability/survival_vs_restart.py --seeds 0,1,2 --out experiments/results/reliability
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORLD_SIZE, VICTIM = 4, 2


def worker(out: str) -> None:
    import torch
    from lightning.fabric import Fabric
    from sklearn.datasets import load_digits
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_gossip import GossipFabricStrategy

    torch.set_num_threads(1)
    seed, epochs = int(os.environ["SEED"]), int(os.environ["EPOCHS"])
    kill_step = int(os.environ.get("KILL_STEP", "-1"))
    strategy = GossipFabricStrategy(p=0.5, asynchronous=True, on_peer_loss=os.environ["ON_PEER_LOSS"], seed=seed,
                                    timeout=timedelta(seconds=60))
    fabric = Fabric(accelerator="cpu", devices=WORLD_SIZE, strategy=strategy)
    fabric.launch()
    rank = fabric.global_rank
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    (x_train, y_train), (x_test, y_test) = (x[:1437], y[:1437]), (x[1437:], y[1437:])
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(
        strategy.share_work(DataLoader(TensorDataset(x_train, y_train), batch_size=16, shuffle=True)),
        use_distributed_sampler=False)
    checkpoint = os.path.join(out, "last.ckpt")
    start_epoch = 0
    if os.environ.get("RESUME"):
        start_epoch = int(fabric.load(checkpoint, {"model": model, "optimizer": optimizer})["epoch"]) + 1
    steps, step_times = 0, []
    for epoch in range(start_epoch, epochs):
        for xb, yb in loader:
            if rank == VICTIM and steps == kill_step and not os.environ.get("RESUME"):
                with open(os.path.join(out, "killed_at"), "w") as f:
                    f.write(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            loss = nn.functional.cross_entropy(model(xb), yb)
            fabric.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            steps += 1
            step_times.append(time.time())
        fabric.save(checkpoint, {"model": model, "optimizer": optimizer, "epoch": epoch})
    strategy.end()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"accuracy": accuracy, "steps": steps, "step_times": step_times,
                   "weight_lost": strategy.averager.loss_report.weight_lost}, f)


def launch(out: Path, **env: str) -> tuple[int, float, str]:
    start = time.monotonic()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **env}
    full_env.pop("LOCAL_RANK", None)
    proc = subprocess.run([sys.executable, "-m", "lightning_gossip.gossip.launch", "--nproc", str(WORLD_SIZE),
                           __file__, "--worker", str(out)], env=full_env, capture_output=True, text=True, timeout=900)
    return proc.returncode, time.monotonic() - start, proc.stdout + proc.stderr


def scenario(name: str, seed: int, epochs: int, kill_step: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        common = {"SEED": str(seed), "EPOCHS": str(epochs)}
        if name == "no_fault":
            code, wall, log = launch(out, ON_PEER_LOSS="continue", **common)
            codes = [code]
        elif name == "survive":
            code, wall, log = launch(out, ON_PEER_LOSS="continue", KILL_STEP=str(kill_step), **common)
            codes = [code]
        else:
            code, first, log = launch(out, ON_PEER_LOSS="fail", KILL_STEP=str(kill_step), **common)
            code2, second, log2 = launch(out, ON_PEER_LOSS="fail", RESUME="1", **common)
            codes, wall, log = [code, code2], first + second, log + log2
        records = {int(p.stem[4:]): json.loads(p.read_text()) for p in out.glob("rank*.json")}
        if not records:
            raise RuntimeError(f"{name} seed {seed}: no rank finished (exit codes {codes}):\n{log[-4000:]}")
        result = {"scenario": name, "seed": seed, "exit_codes": codes, "wall_s": round(wall, 2),
                  "accuracy": records[min(records)]["accuracy"], "finished_ranks": sorted(records),
                  "weight_lost": records[min(records)]["weight_lost"]}
        killed = out / "killed_at"
        if name == "survive" and killed.exists():
            at = float(killed.read_text())
            result["kill_to_next_step_s"] = {
                r: round(min(t for t in rec["step_times"] if t > at) - at, 3)
                for r, rec in records.items() if any(t > at for t in rec["step_times"])}
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill-step", type=int, default=30, help="the victim's step (about 22 steps per epoch)")
    parser.add_argument("--out", default=None, help="folder for survival_vs_restart.json")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in ("no_fault", "survive", "restart"):
            result = scenario(name, seed, args.epochs, args.kill_step)
            print(json.dumps(result), flush=True)
            results.append(result)
    summary = {}
    for name in ("no_fault", "survive", "restart"):
        rows = [r for r in results if r["scenario"] == name]
        summary[name] = {key: (round(statistics.mean(r[key] for r in rows), 4),
                               round(statistics.pstdev(r[key] for r in rows), 4)) for key in ("wall_s", "accuracy")}
    print(json.dumps(summary, indent=1))
    if args.out:
        path = Path(args.out) / "survival_vs_restart.json"
        path.write_text(json.dumps({"settings": vars(args), "runs": results, "mean_std": summary}, indent=1))


if __name__ == "__main__":
    main()
