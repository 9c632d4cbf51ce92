"""The benchmark's "before" variant (one message per tensor) computes what the flat message does (3 gloo ranks)."""

import torch
from torch import nn

from lightning_gossip.gossip import GossipAverager
from tests.helpers.distributed import run_distributed


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


def _per_tensor_vs_flat(rank: int, world_size: int, steps: int):
    from experiments.benchmark.variants import PerTensorExchange

    results = []
    for per_tensor in (False, True):
        model = _model(rank)
        averager = GossipAverager(model, p=0.6, seed=5, exchange=PerTensorExchange if per_tensor else None)
        assert isinstance(averager.exchange, PerTensorExchange) == per_tensor
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
