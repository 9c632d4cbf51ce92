"""The benchmark's own algorithm variants keep GoSGD's invariants (2-3 real gloo ranks, a few seconds)."""

import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager
from tests.dist_utils import run_distributed


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3))


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _perturb(model: nn.Module, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(1000 * rank + step)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)


def _stale_run(rank: int, world_size: int, staleness: int, p: float, steps: int, train: bool):
    from experiments.benchmark.variants import make_stale

    model = _model(rank)
    averager = make_stale(GossipAverager(model, p=p, seed=3), staleness)
    mean0, _ = averager.state.weighted_mean()
    masses, mean_drift = [], 0.0
    for step in range(steps):
        if train:
            _perturb(model, rank, step)
        averager.step()
        # total mass, messages in flight included (a collective on every rank)
        mass = torch.tensor([averager.weight + averager.in_flight_weight()], dtype=torch.float64)
        dist.all_reduce(mass)
        masses.append(float(mass))
        mean_drift = max(mean_drift, float((averager._mean()[0] - mean0).abs().max()))
    in_flight_before = averager.in_flight
    distance = averager.consensus_()
    return {
        # (small results only: the test helper returns them through a pipe)
        "masses": masses, "mean_drift": mean_drift, "final": _flat(model), "weight": averager.weight,
        "in_flight_before": in_flight_before, "distance": distance, "counters": averager.counters.as_dict(),
        "message_bytes": averager.state.message_bytes,
    }


def test_stale_averager_keeps_mass_and_mean_and_reaches_consensus():
    out = run_distributed(_stale_run, 3, 4, 0.5, 40, False)
    for r in out:
        assert all(abs(m - 1.0) < 1e-12 for m in r["masses"])  # mass, in flight included
        assert r["mean_drift"] < 1e-6  # gossip alone never moves the weighted mean
        assert r["in_flight_before"]
        assert abs(r["weight"] - 1 / 3) < 1e-12
    for r in out[1:]:  # exact consensus at the end
        torch.testing.assert_close(r["final"], out[0]["final"], atol=0, rtol=0)


def test_stale_averager_with_training_is_deterministic_and_counts_bytes():
    a = run_distributed(_stale_run, 2, 3, 0.5, 30, True)
    b = run_distributed(_stale_run, 2, 3, 0.5, 30, True)
    torch.testing.assert_close(a[0]["final"], b[0]["final"], atol=0, rtol=0)
    for r in a:
        assert r["counters"]["bytes_sent"] == r["counters"]["messages_sent"] * r["message_bytes"]
        assert r["counters"]["messages_sent"] > 0


def _per_tensor_vs_flat(rank: int, world_size: int, steps: int):
    from experiments.benchmark.variants import PerTensorExchange

    results = []
    for per_tensor in (False, True):
        model = _model(rank)
        averager = GossipAverager(model, p=0.6, seed=5)
        if per_tensor:
            old = averager.exchange
            averager.exchange = PerTensorExchange(old.state, old.rank)
        for step in range(steps):
            _perturb(model, rank, step)
            averager.step()
        results.append((_flat(model), averager.weight, averager.counters.as_dict()))
    return results


def test_per_tensor_exchange_matches_the_flat_message():
    for (flat, w_flat, c_flat), (per, w_per, c_per) in run_distributed(_per_tensor_vs_flat, 3, 25):
        torch.testing.assert_close(per, flat, atol=1e-6, rtol=0)
        assert w_per == w_flat
        assert c_per == c_flat  # same messages and bytes counted
