"""Real Trainer runs with several CPU workers, launched the ways Lightning users launch.

Lightning's default launcher re-runs ``sys.argv``, so these run a script in a subprocess, as Lightning's own tests
do; each rank writes what it did, and the assertions read it back.
"""

import itertools
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.distributed import free_port
from tests.helpers.processes import run_command, script_env

SCRIPT = Path(__file__).parent / "scripts" / "fit_and_record.py"
ROOT = Path(__file__).resolve().parents[2]


def _run(args: list[str], out: Path, timeout: float = 240) -> list[dict]:
    run = run_command(args, timeout, env=script_env(MASTER_PORT=str(free_port())), cwd=out)
    assert run.returncode == 0 and not run.survivors, run.output[-9000:]
    ranks = sorted(out.glob("rank*.pt"))
    return [torch.load(path, weights_only=False) for path in ranks]


def _fit(tmp_path: Path, *options: str) -> list[dict]:
    return _run([sys.executable, str(SCRIPT), str(tmp_path), *options], tmp_path)


@pytest.mark.slow
def test_four_cpu_workers_gossip_instead_of_all_reduce(tmp_path):
    records = _fit(tmp_path, "--devices", "4", "--p", "0.5", "--epochs", "2")
    assert [r["rank"] for r in records] == [0, 1, 2, 3]
    assert all(r["strategy"] == "GossipStrategy" and r["world_size"] == 4 for r in records)

    # every rank saw its own shard: within an epoch, the samples of two ranks never overlap
    per_epoch = len(records[0]["seen"]) // 2
    for a, b in itertools.combinations(records, 2):
        assert not set(a["seen"][:per_epoch]) & set(b["seen"][:per_epoch])

    # no all-reduce: mid-training the ranks' weights differ; after fit they are identical (the exact consensus)
    mid = len(records[0]["params_per_step"]) // 2
    assert any(not torch.equal(records[0]["params_per_step"][mid], r["params_per_step"][mid]) for r in records[1:])
    assert all(torch.equal(records[0]["final_params"], r["final_params"]) for r in records[1:])

    # the gossip weights sum to 1 across ranks after every step
    steps = len(records[0]["weights_per_step"])
    for step in range(steps):
        assert abs(sum(r["weights_per_step"][step] for r in records) - 1.0) < 1e-12

    # bytes: each message is one flat buffer; the volume is about p x steps x message size
    sent = sum(r["counters"]["messages_sent"] for r in records)
    assert sent == sum(r["counters"]["messages_received"] for r in records)
    expected = 0.5 * steps * 4
    assert abs(sent - expected) < 4 * math.sqrt(expected * 0.5)
    for r in records:
        assert r["counters"]["bytes_sent"] == r["counters"]["messages_sent"] * r["message_bytes"]
        assert r["message_bytes"] - r["model_bytes"] <= 64  # payload is the model, plus a small header
        assert r["counters"]["steps"] == steps

    # validation ran on the consensus: every rank evaluated the same weights
    for r in records[1:]:
        assert torch.equal(records[0]["params_at_validation"], r["params_at_validation"])
    assert records[0]["val_acc"] > 0.8
    assert {"gossip/weight", "gossip/bytes_sent", "gossip/consensus_distance", "train/loss"} <= set(
        records[0]["logged_keys"]
    )


@pytest.mark.slow
def test_registry_string_two_workers_local_eval_and_no_final_consensus(tmp_path):
    records = _fit(
        tmp_path, "--strategy-name", "gossip", "--devices", "2", "--epochs", "1", "--eval-mode", "local"
    )
    # registry default p = 0.1 over 16 steps: whatever was sent, the models differ at the end only if
    # final consensus is off; here it is on (the default), so they are identical.
    assert all(r["strategy"] == "GossipStrategy" for r in records)
    assert torch.equal(records[0]["final_params"], records[1]["final_params"])

    out = tmp_path / "local"
    out.mkdir()
    records = _fit(out, "--devices", "2", "--p", "0.2", "--epochs", "1", "--eval-mode", "local", "--no-final-consensus")
    assert not torch.equal(records[0]["final_params"], records[1]["final_params"])
    # eval_mode="local": each rank validated its own weights, which differ
    assert not torch.equal(records[0]["params_at_validation"], records[1]["params_at_validation"])


def test_torchrun_launch(tmp_path):
    args = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
        str(SCRIPT), str(tmp_path), "--torchrun", "--p", "0.5", "--epochs", "1", "--staleness", "3",
    ]  # fmt: skip
    records = _run(args, tmp_path)
    assert [r["world_size"] for r in records] == [2, 2] and [r["staleness"] for r in records] == [3, 3]
    assert torch.equal(records[0]["final_params"], records[1]["final_params"])
    sent = sum(r["counters"]["messages_sent"] for r in records)
    # bounded staleness 3: up to 3 exchanges were in flight at every step; the end of fit mixed in every one of them
    assert sent > 0 and sent == sum(r["counters"]["messages_received"] for r in records)
    assert [r["gossip_weight"] for r in records] == [0.5, 0.5]


def test_single_device_trains_and_warns(tmp_path):
    run = run_command(
        [sys.executable, str(SCRIPT), str(tmp_path), "--devices", "1", "--epochs", "1"],
        120, env=script_env(PYTHONWARNINGS="default"), cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.output[-3000:]
    assert "nothing is gossiped" in run.output
    (record,) = [torch.load(p, weights_only=False) for p in tmp_path.glob("rank*.pt")]
    assert record["counters"]["bytes_sent"] == 0 and record["gossip_weight"] == 1.0


@pytest.mark.parametrize("name", ["gossip", "gossip_spawn", "gossip_fork"])
def test_strategy_names_are_registered_on_import(name):
    import lightning as L
    from lightning.pytorch.strategies import StrategyRegistry

    import lightning_gossip

    assert name in StrategyRegistry
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=name, logger=False)
    assert isinstance(trainer.strategy, lightning_gossip.GossipStrategy)
    assert trainer.strategy._start_method == {"gossip": "popen", "gossip_spawn": "spawn", "gossip_fork": "fork"}[name]


def test_gossip_outer_registry_name_pairs_every_h_steps_and_ends_at_one_consensus(tmp_path):
    """``strategy="gossip_outer"``: no gossip between outer steps, a random pairing and the outer step every H steps
    (H = 8: an epoch is 8 steps per rank here), equal gossip weights throughout, the exact consensus at the end."""
    from lightning_gossip.gossip.outer import RECOMMENDED_OUTER, random_pairing

    every = RECOMMENDED_OUTER["outer_every"]
    records = _fit(tmp_path, "--strategy-name", "gossip_outer", "--devices", "4", "--epochs", "1")
    steps = len(records[0]["weights_per_step"])
    assert steps == every and all(w == 0.25 for r in records for w in r["weights_per_step"])
    # one message per rank and outer step (4 ranks pair up completely), nothing in between
    assert [r["counters"]["messages_sent"] for r in records] == [steps // every] * 4
    for t in range(steps):
        if (t + 1) % every:  # each rank trains on its own between outer steps
            assert not torch.equal(records[0]["params_per_step"][t], records[1]["params_per_step"][t])
    # the first outer step: every rank starts from the same slow weights, so a pair (which averaged its models and
    # took the same outer step) holds the same model, to rounding (each side averages from its own end)
    params = [r["params_per_step"][every - 1] for r in records]
    partner = random_pairing(7, every - 1, 4)  # the schedule's seed: seed_everything(7)
    for rank in range(4):
        torch.testing.assert_close(params[rank], params[int(partner[rank])], rtol=0, atol=1e-6)
        others = [q for q in range(4) if q not in (rank, int(partner[rank]))]
        assert all((params[rank] - params[q]).abs().max() > 1e-4 for q in others)
    assert all(torch.equal(records[0]["final_params"], r["final_params"]) for r in records[1:])
    assert records[0]["val_acc"] > 0.8
