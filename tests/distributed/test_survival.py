"""Surviving a lost peer (``GossipOptions(asynchronous=True, on_peer_loss="continue")``) on real processes.

4 gloo ranks on 127.0.0.1 train a tiny model with the plain-torch averager and a ``WorkSharingSampler``; one rank is
SIGKILLed (a real signal, by itself, at a chosen moment) and the three survivors must finish every configured epoch
with the accounting of the issue: every chunk of every epoch finished by exactly one rank (the lost rank's finished
chunks count as used, its interrupted one is redone by a survivor), the survivors' gossip weights summing to
``1 - weight_lost`` of the loss report to float64 rounding, and the same final consensus on every survivor. The store
is hosted by the parent process here (as by torchrun's agent), so any rank may die.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gossip.gossip import GossipAverager, GossipOptions
from tests.helpers.distributed import free_port
from tests.helpers.survival import check_survival_accounting

WORLD_SIZE, SAMPLES, BATCH, EPOCHS, VICTIM = 4, 320, 8, 3, 2
PG_TIMEOUT = timedelta(seconds=60)


def _worker(rank, port, kill_where, kill_at, trained_log, results):
    torch.set_num_threads(1)
    try:
        from lightning_gossip.gossip import survival
        from lightning_gossip.gossip.work_sharing import WorkSharingSampler

        store = dist.TCPStore("127.0.0.1", port, WORLD_SIZE, False, timeout=PG_TIMEOUT)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD_SIZE, timeout=PG_TIMEOUT)
        torch.manual_seed(0)
        dataset = TensorDataset(torch.randn(SAMPLES, 4), torch.arange(SAMPLES))
        model = nn.Linear(4, 2)
        gossip = GossipAverager(model, p=0.5, asynchronous=True, on_peer_loss="continue", seed=0)
        victim = rank == VICTIM
        if victim and kill_where == "quiescence":
            # Die inside the quiescence at the end of epoch 0, just before posting to its kill_at-th agreement (1:
            # the counts of messages sent, which the survivors wait for; 2: the weights, after its counts were read).
            original, count = survival.Survivors.gather, [0]

            def gather(self, name, value, what):
                if "quiescence" in what:
                    count[0] += 1
                    if count[0] == kill_at:
                        os.kill(os.getpid(), signal.SIGKILL)
                return original(self, name, value, what)

            survival.Survivors.gather = gather
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        sampler = WorkSharingSampler(dataset, batch_size=BATCH, seed=0, survivors=gossip.survivors)
        loader = DataLoader(dataset, batch_size=BATCH, sampler=sampler)
        rng = random.Random(rank)
        seen, steps = [], 0
        for epoch in range(EPOCHS):
            sampler.set_epoch(epoch)
            ids = []
            for x, index in loader:
                if victim and kill_where == "step" and steps == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                time.sleep(rng.random() * 0.003)
                optimizer.zero_grad()
                model(x).pow(2).mean().backward()
                optimizer.step()
                gossip.step()
                ids += index.tolist()
                steps += 1
                if victim:  # what the victim trained on, written before it can die
                    with open(trained_log, "a") as log:
                        log.write(json.dumps([epoch, index.tolist()]) + "\n")
            gossip.finish()
            seen.append({"ids": ids, "finished": {int(r): c for r, c in sampler.finished_chunks.items()},
                         "weight": gossip.weight})
        gossip.end()
        flat = nn.utils.parameters_to_vector(model.parameters()).detach().double()
        results.put((rank, "ok", json.dumps({
            "seen": seen, "weight": gossip.weight, "report": gossip.loss_report.as_dict(), "flat": flat.tolist(),
            "counters": gossip.counters.as_dict(), "alive": gossip.alive_ranks,
        })))
    except BaseException:  # noqa: BLE001 - reported to the parent
        import traceback

        results.put((rank, "error", traceback.format_exc()))


def _run(tmp_path, kill_where, kill_at, timeout=240):
    port = free_port()
    ctx = mp.get_context("fork")
    results = ctx.SimpleQueue()
    trained_log = str(tmp_path / "victim_trained.jsonl")
    processes = [ctx.Process(target=_worker, args=(r, port, kill_where, kill_at, trained_log, results))
                 for r in range(WORLD_SIZE)]
    for process in processes:
        process.start()
    # The store lives here, outside every rank (as with torchrun's agent): a run cannot survive losing its store.
    host = dist.TCPStore("127.0.0.1", port, WORLD_SIZE, True, wait_for_workers=False, timeout=PG_TIMEOUT)
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.join(max(0.1, deadline - time.monotonic()))
    finally:
        hung = [r for r, p in enumerate(processes) if p.is_alive()]
        for process in processes:
            if process.is_alive():
                process.kill()
    out, errors = {}, {}
    while not results.empty():
        rank, status, value = results.get()
        (out if status == "ok" else errors)[rank] = json.loads(value) if status == "ok" else value
    del host
    assert not hung, f"ranks {hung} still running after {timeout} s; errors: {errors}"
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    assert processes[VICTIM].exitcode == -signal.SIGKILL
    assert sorted(out) == [r for r in range(WORLD_SIZE) if r != VICTIM]
    victim_trained = {}
    if os.path.exists(trained_log):
        with open(trained_log) as log:
            for line in log:
                epoch, ids = json.loads(line)
                victim_trained.setdefault(epoch, []).extend(ids)
    return out, victim_trained


def _check_accounting(out, victim_trained):
    return check_survival_accounting(out, [VICTIM], victim_trained, EPOCHS, SAMPLES, BATCH)


@pytest.mark.parametrize("kill_step", [13, pytest.param(4, marks=pytest.mark.slow),
                                       pytest.param(8, marks=pytest.mark.slow)])
def test_survivors_finish_after_a_peer_is_killed_mid_epoch(tmp_path, kill_step):
    # Before its step kill_step + 1 (about 10 steps per rank per epoch, fewer or more with the ranks' speeds).
    out, victim_trained = _run(tmp_path, "step", kill_step)
    report = _check_accounting(out, victim_trained)
    account = report["accounts"][0]
    assert account["ranks"] == [VICTIM] and account["survivors"] == sorted(out)
    # The victim trained exactly kill_step batches before it died, and the survivors every configured epoch after it.
    assert sum(len(ids) for ids in victim_trained.values()) == kill_step * BATCH


@pytest.mark.slow
@pytest.mark.parametrize("agreement", [1, 2], ids=["before-posting-counts", "before-posting-weights"])
def test_survivors_finish_after_a_peer_is_killed_during_quiescence(tmp_path, agreement):
    out, victim_trained = _run(tmp_path, "quiescence", agreement)
    report = _check_accounting(out, victim_trained)
    # It died at the end of epoch 0, having trained on its whole share of it and nothing later.
    assert victim_trained.get(0) and not victim_trained.get(1)
    assert report["lost"][0]["rank"] == VICTIM


def test_on_peer_loss_is_validated_before_any_worker_starts():
    with pytest.raises(ValueError, match=r"on_peer_loss must be 'fail' or 'continue', got 'survive'"):
        GossipOptions(asynchronous=True, on_peer_loss="survive")
    with pytest.raises(ValueError, match="on_peer_loss='continue' needs asynchronous=True"):
        GossipOptions(on_peer_loss="continue")
    assert GossipOptions().on_peer_loss == "fail"
    assert GossipOptions(asynchronous=True, on_peer_loss="continue").on_peer_loss == "continue"


def test_trainer_strategy_refuses_continue_clearly_and_both_strategies_name_bad_values():
    import lightning_gossip

    with pytest.raises(ValueError, match=r"GossipStrategy\(on_peer_loss='continue'\) is not supported: .*"
                                         r"GossipFabricStrategy\(asynchronous=True, on_peer_loss='continue'\)"):
        lightning_gossip.GossipStrategy(asynchronous=True, on_peer_loss="continue")
    for adapter in ("GossipStrategy", "GossipFabricStrategy"):
        strategy = getattr(lightning_gossip, adapter)
        with pytest.raises(ValueError, match=r"on_peer_loss must be 'fail' or 'continue', got 'ignore'"):
            strategy(asynchronous=True, on_peer_loss="ignore")
        assert strategy(asynchronous=True, on_peer_loss="fail").options.on_peer_loss == "fail"
    fabric = lightning_gossip.GossipFabricStrategy(asynchronous=True, on_peer_loss="continue")
    assert fabric.options.on_peer_loss == "continue"
