"""Surviving a lost peer: time from a SIGKILL to the survivors' next steps, and accuracy against a run with no fault.

4 gloo ranks on 127.0.0.1 (CPU), plain-torch ``GossipAverager(asynchronous=True, on_peer_loss="continue")`` with a
``WorkSharingSampler`` on scikit-learn's digits (a 64-32-10 MLP, SGD, batch 16). Two runs with the same seeds: no
fault, and rank 2 SIGKILLed by itself at its step ``--kill-step`` (in epoch 1). The store is hosted by this process
(as by torchrun's agent). Reports, per survivor, the time from the kill to its first completed step after it and the
longest gap between its steps around the kill, the time until it learned of the loss, the loss accounting, and the
test accuracy of the final consensus in both runs.

    nice -n 19 python experiments/reliability/survival.py --out experiments/results/reliability/survival.json
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WORLD_SIZE, VICTIM = 4, 2


def _data():
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return (x[:1437], y[:1437]), (x[1437:], y[1437:])


def _worker(rank, port, epochs, kill_step, results):
    torch.set_num_threads(1)
    try:
        from lightning_gossip.gossip import GossipAverager
        from lightning_gossip.gossip.work_sharing import WorkSharingSampler

        store = dist.TCPStore("127.0.0.1", port, WORLD_SIZE, False, timeout=timedelta(seconds=60))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
        (x, y), (x_test, y_test) = _data()
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        gossip = GossipAverager(model, p=0.5, asynchronous=True, on_peer_loss="continue", seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sampler = WorkSharingSampler(len(x), batch_size=16, seed=0, survivors=gossip.survivors)
        loader = DataLoader(TensorDataset(x, y), batch_size=16, sampler=sampler)
        steps, step_times = 0, []
        for epoch in range(epochs):
            sampler.set_epoch(epoch)
            for xb, yb in loader:
                if rank == VICTIM and steps == kill_step:
                    results.put((rank, "killed", json.dumps({"at": time.time(), "step": steps})))
                    time.sleep(0.2)  # the parent reads it before the process goes
                    os.kill(os.getpid(), signal.SIGKILL)
                optimizer.zero_grad()
                nn.functional.cross_entropy(model(xb), yb).backward()
                optimizer.step()
                gossip.step()
                steps += 1
                step_times.append(time.time())
            gossip.finish()
        gossip.end()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        results.put((rank, "ok", json.dumps({
            "accuracy": accuracy, "weight": gossip.weight, "steps": steps, "step_times": step_times,
            "report": gossip.loss_report.as_dict(), "counters": gossip.counters.as_dict(),
        })))
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        results.put((rank, "error", traceback.format_exc()))


def run(epochs: int, kill_step: int) -> dict:
    from torch.distributed.elastic.utils.distributed import get_free_port

    port = get_free_port()
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    processes = [ctx.Process(target=_worker, args=(r, port, epochs, kill_step, results)) for r in range(WORLD_SIZE)]
    started = time.time()
    for process in processes:
        process.start()
    host = dist.TCPStore("127.0.0.1", port, WORLD_SIZE, True, wait_for_workers=False, timeout=timedelta(seconds=60))
    for process in processes:
        process.join(300)
    for process in processes:
        if process.is_alive():
            process.kill()
    wall = time.time() - started
    out, killed = {}, None
    while not results.empty():
        rank, status, value = results.get()
        if status == "error":
            raise RuntimeError(f"rank {rank} failed:\n{value}")
        if status == "killed":
            killed = json.loads(value)
        else:
            out[rank] = json.loads(value)
    del host
    summary = {"kill_step": kill_step if kill_step >= 0 else None, "wall_s": round(wall, 2),
               "exit_codes": [p.exitcode for p in processes], "ranks": {}}
    for rank, result in sorted(out.items()):
        entry = {"accuracy": result["accuracy"], "steps": result["steps"], "weight": result["weight"]}
        times = result["step_times"]
        gaps = [b - a for a, b in zip(times, times[1:])]
        entry["median_step_s"] = sorted(gaps)[len(gaps) // 2] if gaps else None
        if killed is not None:
            kill = killed["at"] + 0.2  # when the SIGKILL was sent (after the 0.2 s pause)
            before = [t for t in times if t <= kill]
            after = [t for t in times if t > kill]
            entry["last_step_before_kill_s"] = round(kill - before[-1], 4) if before else None
            entry["kill_to_next_step_s"] = round(after[0] - kill, 4) if after else None
            # The gap between this rank's steps across the kill (its epoch's end included if it fell in between).
            entry["step_gap_across_kill_s"] = round(after[0] - before[-1], 4) if before and after else None
            entry["steps_after_kill"] = len(after)
            lost = result["report"]["lost"]
            entry["learned_of_loss_s"] = round(lost[0]["declared_at"] - kill, 4) if lost else None
            entry["counters"] = result["counters"]
        summary["ranks"][rank] = entry
    if killed is not None and out:
        report = next(iter(out.values()))["report"]
        summary["report"] = report
        summary["survivors_weight_sum"] = sum(r["weight"] for r in out.values())
        summary["one_minus_weight_lost"] = 1.0 - report["weight_lost"]
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--kill-step", type=int, default=30, help="the victim's step (about 22 steps per epoch)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    os.environ.setdefault("LIGHTNING_GOSSIP_VERIFY", "1")
    results = {"command": "nice -n 19 python experiments/reliability/survival.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None),
        "no_fault": run(args.epochs, -1), "killed": run(args.epochs, args.kill_step)}
    text = json.dumps(results, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
