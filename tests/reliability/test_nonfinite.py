"""A worker whose weights turn NaN/Inf must not poison the others (real gloo processes).

Rank 0's weights get one NaN (or Inf) entry; it keeps gossiping. Every message it sends is rejected by its receiver:
not mixed in, its gossip weight absorbed (total mass stays 1 at every step), counted in ``messages_rejected``, and a
warning names rank 0. The other ranks stay finite. The consensus leaves rank 0 out (and, in ``consensus_``, gives it
the others' average back). ``on_nonfinite="error"`` raises instead, and the other ranks stop with a lost-peer error
rather than hang.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager, GossipPeerError, NonFiniteGossipError
from tests.helpers.distributed import run_distributed

# Imported here, not in the workers: forked workers inherit it instead of importing Lightning each.
WORLD_SIZE = 3
STEPS = 25


def _poisoned_run(rank: int, world_size: int, value: float, overlap: bool, steps: int) -> dict:
    torch.manual_seed(rank)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4))
    gossip = GossipAverager(model, p=0.7, topology="random", seed=11, overlap=overlap)
    if rank == 0:
        with torch.no_grad():
            model[0].weight[1, 2] = value
    masses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            gossip.step()
            mass = torch.tensor([gossip.weight + gossip.in_flight_weight()], dtype=torch.float64)
            dist.all_reduce(mass)
            masses.append(float(mass.item()))
        gossip.finish()
        finite_before_consensus = all(bool(torch.isfinite(t).all()) for t in gossip.state.tensors)
        counters = gossip.counters.as_dict()
        gossip.consensus_()
    weights = torch.tensor([gossip.weight], dtype=torch.float64)
    dist.all_reduce(weights)
    return {
        "masses": masses,
        "finite_before_consensus": finite_before_consensus,
        "finite_after_consensus": all(bool(torch.isfinite(t).all()) for t in gossip.state.tensors),
        "counters": counters,
        "weight_after_consensus": gossip.weight,
        "mass_after_consensus": float(weights.item()),
        "warnings": [str(w.message) for w in caught],
        "model": [t.detach().clone().tolist() for t in gossip.state.tensors],
    }


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
@pytest.mark.parametrize("value", [math.nan, math.inf], ids=["nan", "inf"])
def test_nonfinite_worker_does_not_poison_the_others(value: float, overlap: bool) -> None:
    results = run_distributed(_poisoned_run, WORLD_SIZE, value, overlap, STEPS, timeout=90)
    sent_by_poisoned = results[0]["counters"]["messages_sent"]
    assert sent_by_poisoned > 5  # the test means something: rank 0 kept sending
    rejected = [r["counters"]["messages_rejected"] for r in results]
    assert rejected[0] == 0 and sum(rejected) == sent_by_poisoned  # every message of rank 0, and only those
    assert not results[0]["finite_before_consensus"]
    for rank, result in enumerate(results):
        # Mass stays 1 at every step (messages in flight included), to float64 rounding.
        assert max(abs(m - 1.0) for m in result["masses"]) < 1e-12, result["masses"]
        if rank:
            assert result["finite_before_consensus"], f"rank {rank} was poisoned"
        gossip_warnings = [w for w in result["warnings"] if "received a gossip message with NaN/Inf" in w]
        assert len(gossip_warnings) == rejected[rank]
        for text in gossip_warnings:
            assert f"Rank {rank} received a gossip message with NaN/Inf values from rank 0 at step" in text
            assert "it was not mixed in (its gossip weight was kept so the total stays 1)" in text
        # The final consensus leaves rank 0 out, says so on every rank, and gives rank 0 the others' average.
        consensus_warnings = [w for w in result["warnings"] if w.startswith("Gossip consensus")]
        assert consensus_warnings and "rank(s) [0] hold NaN/Inf weights" in consensus_warnings[-1]
        assert result["finite_after_consensus"]
        assert result["weight_after_consensus"] == pytest.approx(1 / WORLD_SIZE, abs=1e-15)
        assert result["mass_after_consensus"] == pytest.approx(1.0, abs=1e-12)
        assert result["model"] == results[0]["model"]  # everyone holds the same consensus


def _error_mode_run(rank: int, world_size: int, phase: str) -> tuple[str, str]:
    torch.manual_seed(rank)
    model = nn.Linear(6, 4)
    # Ring, p=1: at every step rank 0 sends to rank 1, rank 1 to rank 2, rank 2 to rank 0.
    gossip = GossipAverager(model, p=1.0 if phase == "gossip" else 0.0, topology="ring", on_nonfinite="error")
    if rank == 0:
        with torch.no_grad():
            model.weight[0, 0] = math.nan
    try:
        for _ in range(5):
            gossip.step()
        gossip.consensus_()
    except (NonFiniteGossipError, GossipPeerError, FloatingPointError) as error:
        return type(error).__name__, str(error)
    return "none", ""


def test_on_nonfinite_error_raises_and_the_others_stop() -> None:
    results = run_distributed(_error_mode_run, WORLD_SIZE, "gossip", timeout=90, pg_timeout_s=20)
    kind, text = results[1]
    assert kind == "NonFiniteGossipError", results
    assert "Rank 1 received a gossip message with NaN/Inf values from rank 0 at step 0" in text
    # Rank 1 stopped, so the ranks waiting for it stop too, with an error instead of a hang.
    assert results[2][0] == "GossipPeerError" and "rank 1" in results[2][1], results[2]
    assert results[0][0] in ("GossipPeerError", "NonFiniteGossipError"), results[0]


def test_on_nonfinite_error_in_the_consensus() -> None:
    results = run_distributed(_error_mode_run, WORLD_SIZE, "consensus", timeout=90)
    for kind, text in results:  # no gossip (p=0): the consensus finds rank 0 non-finite, on every rank alike
        assert kind == "FloatingPointError", text
        assert "rank(s) [0] hold NaN/Inf weights" in text
