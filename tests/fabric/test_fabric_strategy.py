"""GossipFabricStrategy with real processes: a user's Fabric loop (tests/fabric/scripts/fabric_loop.py) on
``Fabric(accelerator="cpu", devices=3, strategy=...)``: each rank its own shard, ranks' weights differ mid-training,
identical after ``fabric.strategy.consensus_()``; ``fabric.save`` writes the consensus as the model entry (loadable
without gossip) and every rank's own state; ``fabric.load`` resumes every rank exactly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lightning_gossip.gossip import GossipOptions
from tests.fabric.scripts.fabric_loop import N, model_factory, vector
from tests.helpers.processes import run_script

SCRIPT = Path(__file__).parent / "scripts" / "fabric_loop.py"
RANKS = 3
STEPS = N // RANKS // 4


def run_loop(out: Path, *args: str) -> list[dict]:
    run = run_script(SCRIPT, [str(out), *args], timeout=300, cwd=out)
    assert run.returncode == 0, run.output[-6000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    phase = args[args.index("--phase") + 1]
    return [torch.load(out / f"{phase}_rank{r}.pt", weights_only=False) for r in range(RANKS)]


def straight_run(tmp_path_factory, strategy: str) -> tuple[Path, list[dict]]:
    """The user's loop with a registered name and its default options: 2 epochs, a save after the first."""
    out = tmp_path_factory.mktemp(strategy)
    return out, run_loop(out, "--phase", "straight", "--strategy", strategy)


def model_entry_vector(entry: dict) -> torch.Tensor:
    """A checkpoint's model entry loaded into a plain model (no gossip), as the loop's ``vector`` of it."""
    plain = model_factory()
    plain.load_state_dict(entry)
    return vector(plain)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, list[dict]]:
    return straight_run(tmp_path_factory, "gossip")


@pytest.mark.slow
def test_ranks_differ_mid_training_and_agree_after_consensus(straight):
    _, ranks = straight
    for record in ranks:
        assert record["strategy"] == "lightning_gossip.fabric.GossipFabricStrategy"
        assert len(record["epoch1_seen"]) == N // RANKS
    assert sum(r["counters"]["messages_sent"] for r in ranks) == sum(r["counters"]["messages_received"] for r in ranks)
    assert sum(r["counters"]["messages_sent"] for r in ranks) >= 5
    # each rank its own shard: together every sample once per epoch
    assert sorted(sum((r["epoch1_seen"] for r in ranks), [])) == list(range(N))
    mid = ranks[0]["mid_all_ranks"]
    assert mid.shape[0] == RANKS
    assert all(not torch.equal(mid[i], mid[j]) for i in range(RANKS) for j in range(i + 1, RANKS))
    after = ranks[0]["after_consensus_all_ranks"]
    assert all(torch.equal(after[0], after[i]) for i in range(RANKS))
    assert ranks[0]["distance_removed"] > 0


def test_save_load_round_trip_resumes_every_rank_exactly(straight):
    out, ranks = straight
    resumed = run_loop(out, "--phase", "resume", "--strategy", "gossip")
    for r in range(RANKS):
        s, m = ranks[r], resumed[r]
        assert torch.equal(m["own_after_load"], s["own_at_save"]), f"rank {r} did not get its own weights back"
        assert m["gossip_step_after_load"] == s["gossip_step_at_save"] == STEPS
        assert m["loaded_epoch"] == 1 and m["remainder_keys"] == []
        # weights, momentum, gossip weight, schedule position and counters all came back: the resumed epoch is the
        # straight run's epoch, bit for bit, step by step
        assert torch.equal(m["epoch2_steps"], s["epoch2_steps"]), f"rank {r} did not resume exactly"

    # the file: the model entry is the consensus at the save, loadable into a plain model without gossip
    checkpoint = torch.load(out / "gossip.ckpt", weights_only=False)
    consensus = model_entry_vector(checkpoint["model"])
    torch.testing.assert_close(consensus, ranks[0]["consensus_at_save"], rtol=0, atol=1e-6)
    assert checkpoint["epoch"] == 1
    parts = saved_parts(out / "gossip.ckpt")  # one part per rank, written by that rank: rank 0's file stays small
    weights = [part["gossip"]["weight"] for part in parts]
    assert abs(sum(weights) - 1.0) < 1e-12, weights  # blocking exchange: no weight in flight at a save
    assert sorted(parts[0]) == ["gossip", "gossip_part", "model", "optimizer"]
    # each part carries its header: this save, its rank, the world size, and the digest the main file records too
    assert [part["gossip_part"]["rank"] for part in parts] == list(range(len(parts)))
    assert {part["gossip_part"]["save_id"] for part in parts} == {checkpoint["gossip"]["save_id"]}
    assert [part["gossip_part"]["digest"] for part in parts] == checkpoint["gossip"]["part_digests"]
    assert "ranks" not in checkpoint["gossip"] and "model" not in checkpoint["gossip"]


def saved_parts(path: Path) -> list[dict]:
    """Every rank's part of a Fabric gossip checkpoint (the Trainer strategy's format: named by the main file)."""
    from lightning_gossip.checkpoint_io import part_path

    gossip = torch.load(path, weights_only=False)["gossip"]
    assert gossip["world_size"] == RANKS and set(gossip) >= {"parts", "save_id", "step"}
    return [torch.load(part_path(str(path), gossip["parts"], r), weights_only=False) for r in range(RANKS)]


def test_options_are_the_shared_gossip_options_checked_once():
    import lightning_gossip
    from lightning.fabric.strategies import STRATEGY_REGISTRY

    strategy = lightning_gossip.GossipFabricStrategy(p=0.3, topology="ring", staleness=2, transfer_dtype="bfloat16")
    expected = GossipOptions(p=0.3, topology="ring", staleness=2, transfer_dtype="bfloat16")
    assert type(strategy.options.topology) is type(expected.topology)
    def fields(options: GossipOptions) -> dict:
        return {f.name: getattr(options, f.name) for f in dataclasses.fields(options) if f.name != "topology"}

    assert fields(strategy.options) == fields(expected)
    assert strategy.options.staleness == 2 and strategy.options.transfer_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="probability p must be"):
        lightning_gossip.GossipFabricStrategy(p=1.5)
    with pytest.raises(ValueError, match="staleness"):
        lightning_gossip.GossipFabricStrategy(staleness=-1)
    for name, start_method in (("gossip", "popen"), ("gossip_spawn", "spawn"), ("gossip_fork", "fork")):
        entry = STRATEGY_REGISTRY[name]
        assert entry["strategy"] is lightning_gossip.GossipFabricStrategy
        assert entry["init_params"]["start_method"] == start_method


@pytest.fixture(scope="module")
def asynchronous(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The same loop with ``strategy="gossip_async"``: no rank waits for another between the collectives."""
    return straight_run(tmp_path_factory, "gossip_async")


def test_asynchronous_loop_trains_every_shard_and_ends_at_one_consensus(asynchronous):
    _, ranks = asynchronous
    for record in ranks:
        assert record["strategy"] == "lightning_gossip.fabric.GossipFabricStrategy"
    assert sorted(sum((r["epoch1_seen"] for r in ranks), [])) == list(range(N))
    # consensus_() brought every message home: none lost, none counted twice
    assert sum(r["counters"]["messages_sent"] for r in ranks) == sum(r["counters"]["messages_received"] for r in ranks)
    assert sum(r["counters"]["messages_sent"] for r in ranks) >= 3
    after = ranks[0]["after_consensus_all_ranks"]
    assert all(torch.equal(after[0], after[i]) for i in range(RANKS))


@pytest.mark.slow
def test_asynchronous_save_is_a_consistent_cut_and_resumes_every_rank(asynchronous):
    """fabric.save in asynchronous mode first brings the messages on the wire home: the saved gossip weights sum to
    one (nothing on the wire is lost from the checkpoint), and the saved model is the consensus of the saved parts."""
    out, ranks = asynchronous
    checkpoint = torch.load(out / "gossip.ckpt", weights_only=False)
    parts = saved_parts(out / "gossip.ckpt")
    weights = [part["gossip"]["weight"] for part in parts]
    assert abs(sum(weights) - 1.0) < 1e-12, weights
    assert all(part["gossip"]["in_flight"] == [] for part in parts)
    own = [model_entry_vector(part["model"]) for part in parts]
    weighted = sum(w * x.double() for w, x in zip(weights, own)) / sum(weights)
    torch.testing.assert_close(model_entry_vector(checkpoint["model"]).double(), weighted, rtol=0, atol=1e-6)
    resumed = run_loop(out, "--phase", "resume", "--strategy", "gossip_async")
    for r in range(RANKS):
        assert torch.equal(resumed[r]["own_after_load"], ranks[r]["own_at_save"]), f"rank {r} lost its own weights"
        assert torch.equal(resumed[r]["own_after_load"], own[r])
        assert resumed[r]["gossip_step_after_load"] == ranks[r]["gossip_step_at_save"]
        assert resumed[r]["loaded_epoch"] == 1


@pytest.fixture(scope="module")
def outer(tmp_path_factory) -> tuple[Path, list[dict]]:
    """The same loop with ``strategy="gossip_outer"``: pairings and outer steps every H steps, nothing in between."""
    return straight_run(tmp_path_factory, "gossip_outer")


@pytest.mark.slow  # two more 3-process Fabric launches; the Trainer run of "gossip_outer" is in the default suite
def test_gossip_outer_loop_saves_the_outer_state_and_resumes_every_rank_exactly(outer):
    from lightning_gossip.gossip.outer import RECOMMENDED_OUTER

    out, ranks = outer
    every = RECOMMENDED_OUTER["outer_every"]
    # 3 ranks: each round pairs two of them and one sits out, so 2 messages per outer step
    assert sum(r["counters"]["messages_sent"] for r in ranks) == 2 * (2 * STEPS // every)
    after = ranks[0]["after_consensus_all_ranks"]
    assert all(torch.equal(after[0], after[i]) for i in range(RANKS))
    parts = saved_parts(out / "gossip.ckpt")
    for part in parts:  # every rank's part holds its slow weights and outer momentum
        assert part["gossip"]["weight"] == pytest.approx(1 / RANKS, abs=1e-15)
        assert sorted(part["gossip"]["outer"]) == ["momentum", "slow"]
    assert parts[0]["gossip"]["outer"]["momentum"].abs().sum() > 0  # saved after an outer step
    resumed = run_loop(out, "--phase", "resume", "--strategy", "gossip_outer")
    for r in range(RANKS):
        assert torch.equal(resumed[r]["own_after_load"], ranks[r]["own_at_save"])
        # epoch 2 holds an outer step: bit for bit only if the slow weights and the momentum came back exactly
        assert torch.equal(resumed[r]["epoch2_steps"], ranks[r]["epoch2_steps"]), f"rank {r} did not resume exactly"


@pytest.mark.slow  # one more 3-process Fabric launch; the Trainer smoke of "gossip_outer_async" is the other
def test_gossip_outer_async_loop_pushes_every_outer_step_and_ends_at_one_consensus(tmp_path_factory):
    """``strategy="gossip_outer_async"`` in a user's Fabric loop: every sample of the shared-out epoch used once, every
    push arrived (sent == received), and one identical consensus on every rank after ``consensus_()``."""
    _, ranks = straight_run(tmp_path_factory, "gossip_outer_async")
    assert sorted(sum((r["epoch1_seen"] for r in ranks), [])) == list(range(N))
    sent = sum(r["counters"]["messages_sent"] for r in ranks)
    assert sent == sum(r["counters"]["messages_received"] for r in ranks) and sent >= 1
    after = ranks[0]["after_consensus_all_ranks"]
    assert all(torch.equal(after[0], after[i]) for i in range(RANKS))
