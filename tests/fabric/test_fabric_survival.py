"""Fabric survives lost peers (``GossipFabricStrategy(asynchronous=True, on_peer_loss="continue")``), real processes.

4 CPU ranks started by ``python -m lightning_gossip.gossip.launch`` (which hosts the store and leaves survivors
running) train a Fabric loop on shared work (``scripts/fabric_survival.py``); ranks SIGKILL themselves at chosen
moments. The survivors must finish every epoch, with Fabric's collectives and ``fabric.save`` after each, and show the
accounting of issue 20 (``tests/helpers/survival.py``); the launcher exits 0 and names the lost ranks; the last
checkpoint resumes on 4 fresh ranks from the survivors' consensus.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from contextlib import suppress
from pathlib import Path

import pytest
import torch

from tests.helpers.processes import processes_with_env, run_command, script_env
from tests.helpers.survival import check_survival_accounting

SCRIPT = Path(__file__).parent / "scripts" / "fabric_survival.py"
WORLD_SIZE, SAMPLES, BATCH, EPOCHS = 4, 320, 8, 3
RUN_ENV = "LIGHTNING_GOSSIP_SURVIVAL_TEST"


def _launch(out: Path, timeout: float = 240, **env: str):
    tag = uuid.uuid4().hex
    cmd = [sys.executable, "-m", "lightning_gossip.gossip.launch", "--nproc", str(WORLD_SIZE), str(SCRIPT), str(out)]
    try:
        run = run_command(cmd, timeout, env=script_env(**{"EPOCHS": str(EPOCHS), RUN_ENV: tag, **env}))
    finally:
        left = processes_with_env(f"{RUN_ENV}={tag}")
        for pid in left:  # by pid, found by the run's own tag
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert not left, f"workers {left} outlived the launcher"
    return run


def _results(out: Path, victims: list[int]):
    records = {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)
               if (out / f"rank{r}.json").exists()}
    victim_trained: dict[int, list[int]] = {}
    for victim in victims:
        log = out / f"victim{victim}.jsonl"
        if log.exists():
            for line in log.read_text().splitlines():
                epoch, ids = json.loads(line)
                victim_trained.setdefault(epoch, []).extend(ids)
                records.setdefault("victims", {}).setdefault(victim, {}).setdefault(epoch, 0)
                records["victims"][victim][epoch] += len(ids)
    return records, victim_trained


def _check_run(run, out: Path, victims: list[int]):
    assert run.returncode == 0, run.output[-6000:]
    for victim in victims:
        assert f"worker rank {victim} " in run.output and "killed by SIGKILL" in run.output, run.output[-3000:]
    assert f"the run finished without rank(s) {sorted(victims)}" in run.output
    records, victim_trained = _results(out, victims)
    victim_counts = records.pop("victims", {})
    assert sorted(records) == [r for r in range(WORLD_SIZE) if r not in victims], run.output[-4000:]
    return records, victim_trained, victim_counts


def _check_epoch_collectives(records, victim_counts):
    survivors = sorted(records)
    for epoch in range(EPOCHS):
        entries = [records[r]["seen"][epoch] for r in survivors]
        # all_reduce(sum) of the samples each rank trained in the epoch: the same on every survivor, over exactly the
        # ranks alive then (all_gather lists them: all four before a loss, then fewer)
        assert len({e["trained_sum"] for e in entries}) == 1
        assert all(e["gathered"] == entries[0]["gathered"] for e in entries)
        members = entries[0]["gathered"]
        expected = sum(len(records[r]["seen"][epoch]["ids"]) if r in records else victim_counts[r][epoch]
                       for r in members)
        assert entries[0]["trained_sum"] == expected, (epoch, members)
        assert all(e["inplace"] == len(members) for e in entries)
        # broadcast_from_survivor: the lowest rank alive in that agreement, the same on every survivor
        assert {e["token"] for e in entries} == {f"epoch {epoch} from rank {min(members)}"}


def test_fabric_survives_a_rank_killed_mid_epoch_and_its_checkpoint_resumes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    run = _launch(out, VICTIMS="2", KILL_AT="13", KILL_WHERE="step")
    records, victim_trained, victim_counts = _check_run(run, out, [2])
    report = check_survival_accounting(records, [2], victim_trained, EPOCHS, SAMPLES, BATCH)
    assert sum(len(ids) for ids in victim_trained.values()) == 13 * BATCH  # it died before its step 14
    _check_epoch_collectives(records, victim_counts)
    assert records[0]["seen"][-1]["gathered"] == [0, 1, 3]  # after the loss: exactly the survivors
    # The checkpoint of the last epoch records the loss; it holds the survivors' consensus and no parts.
    checkpoint = torch.load(out / "last.ckpt", weights_only=False)
    entry = checkpoint["gossip"]
    assert entry["lost_ranks"] == [2] and entry["survivors"] == [0, 1, 3] and "parts" not in entry
    assert entry["loss_report"]["weight_lost"] == pytest.approx(report["weight_lost"], abs=1e-15)
    # Resume on 4 fresh ranks: every rank starts from the checkpoint's consensus with weight 1/4 and trains on.
    again = tmp_path / "resumed"
    again.mkdir()
    resumed = _launch(again, RESUME=str(out / "last.ckpt"), EPOCHS="1", PYTHONWARNINGS="default")
    assert resumed.returncode == 0, resumed.output[-6000:]
    assert "saved after rank(s) [2] of 4 were lost" in resumed.output
    saved = torch.cat([checkpoint["model"]["weight"].flatten(), checkpoint["model"]["bias"].flatten()])
    for r in range(WORLD_SIZE):
        start = json.loads((again / f"resumed_rank{r}.json").read_text())
        assert start["start_epoch"] == EPOCHS and start["weight"] == 0.25
        assert torch.equal(torch.tensor(start["flat"]), saved)
    after = {r: json.loads((again / f"rank{r}.json").read_text()) for r in range(WORLD_SIZE)}
    assert sum(a["weight"] for a in after.values()) == pytest.approx(1.0, abs=1e-12)
    assert all(a["flat"] == after[0]["flat"] for a in after.values())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("victims", "kill_at", "where"),
    [("1,2", "5,17", "step"), ("3", "1", "save"), ("0", "2", "main"), ("0", "0", "end")],
    ids=["two-ranks-mid-epoch", "rank3-in-a-save", "writer-in-the-last-main-file", "rank0-in-end"],
)
def test_fabric_survives_kills_at_other_moments(tmp_path, victims, kill_at, where):
    lost = [int(v) for v in victims.split(",")]
    run = _launch(tmp_path, VICTIMS=victims, KILL_AT=kill_at, KILL_WHERE=where)
    records, victim_trained, victim_counts = _check_run(run, tmp_path, lost)
    report = check_survival_accounting(records, lost, victim_trained, EPOCHS, SAMPLES, BATCH)
    if where != "end":
        _check_epoch_collectives(records, victim_counts)
    if where == "main":  # the writer died writing the last save: the next survivor wrote it (a loss entry)
        entry = torch.load(tmp_path / "last.ckpt", weights_only=False)["gossip"]
        assert entry["lost_ranks"] == [0] and entry["survivors"] == [1, 2, 3], entry
    if where == "end":  # rank 0 died in end(), after every epoch's work
        assert report["lost"][0]["rank"] == 0


def test_continue_is_refused_under_fabrics_own_launcher_before_any_worker_starts():
    from lightning.fabric import Fabric

    from lightning_gossip import GossipFabricStrategy

    env_before = os.environ.pop("LOCAL_RANK", None)
    try:
        with pytest.raises(ValueError, match=r"on_peer_loss='continue'.*lightning_gossip\.gossip\.launch --nproc N"):
            Fabric(accelerator="cpu", devices=2,
                   strategy=GossipFabricStrategy(asynchronous=True, on_peer_loss="continue"))
    finally:
        if env_before is not None:
            os.environ["LOCAL_RANK"] = env_before
    with pytest.raises(ValueError, match="on_peer_loss='continue' needs asynchronous=True"):
        GossipFabricStrategy(on_peer_loss="continue")


def test_launcher_checks_its_arguments_and_reports_exit_codes(tmp_path):
    from lightning_gossip.gossip import launch

    with pytest.raises(ValueError, match="--nproc must be at least 1, got 0"):
        launch.run(["true"], 0)
    with pytest.raises(ValueError, match="--kill-after must be a positive number of seconds, got -1"):
        launch.run(["true"], 1, kill_after=-1)
    # A worker that fails (not lost to a signal) makes the launcher fail with its status; one that dies of a signal
    # leaves the others running and the run succeeds.
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, signal, sys\n"
        "rank = int(os.environ['RANK'])\n"
        "assert os.environ['TORCHELASTIC_USE_AGENT_STORE'] == 'True' and os.environ['WORLD_SIZE'] == '3'\n"
        "if rank == int(sys.argv[1]): os.kill(os.getpid(), signal.SIGKILL)\n"
        "sys.exit(int(sys.argv[2]) if rank == 2 else 0)\n"
    )
    assert launch.run([sys.executable, str(script), "1", "0"], 3) == 0
    assert launch.run([sys.executable, str(script), "1", "7"], 3) == 7
    assert launch.run([sys.executable, str(script), "-1", "0"], 3) == 0
