"""The asynchronous exchange with models on CUDA (marker ``gpu``; skipped without CUDA).

The asynchronous mode sends over a gloo side group from pinned host buffers and mixes on the device, so its CUDA path
needs no second GPU: several gloo ranks share GPU 0 (every rank's model on ``cuda:0``). With 2 or more GPUs it also
runs beside NCCL, one rank per GPU: the default group is NCCL (the consensus and drain collectives run there) and
the gossip messages take the gloo side group. Checked: the state stays on the device, the mass (sum of gossip
weights) is 1 to float64 rounding at every quiescent point and the weighted mean is fixed (learning rate 0) while
ranks step at different speeds, messages flow both ways, and ``end()`` leaves the same consensus on every rank.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager
from tests.gpu.nccl import gpu_count, mass_and_mean, run_gloo_on_one_gpu, run_nccl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WORLD = min(gpu_count(), 8)
SHARED_RANKS = 3  # gloo ranks on one card


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device())


def _async_run(rank: int, world_size: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(_device())
    averager = GossipAverager(model, p=0.5, seed=11, asynchronous=True)
    g = torch.Generator(device=_device()).manual_seed(100 + rank)
    with torch.no_grad():  # different models on every rank, so mixing is visible
        for t in averager.state.tensors:
            t.copy_(torch.randn(t.shape, generator=g, device=_device()))
    mass0, mean0 = mass_and_mean(averager)
    start = averager.consensus_distance()
    jitter = random.Random(rank)
    mass_errors, drift = [abs(mass0 - 1.0)], 0.0
    for step in range(steps):
        time.sleep(jitter.random() * 0.002 * (rank + 1))  # ranks at different speeds: nobody waits for anybody
        averager.step()
        if step % 25 == 24:
            mass, mean = mass_and_mean(averager)
            mass_errors.append(abs(mass - 1.0))
            drift = max(drift, float((mean - mean0).abs().max()))
    end = averager.consensus_distance()
    averager.end(consensus=True)
    flat = averager.state.flatten()
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat)
    return {
        "mass_error": max(mass_errors), "mean_drift": drift, "start": start, "end": end,
        "identical_after_end": all(torch.equal(everyone[0], t) for t in everyone),
        "state_device": str(averager.state.device), "backend": dist.get_backend(),
        "counters": averager.counters.as_dict(),
    }


def _check(results: list[dict], backend: str) -> None:
    for r in results:
        assert r["backend"] == backend
        assert r["state_device"].startswith("cuda"), r
        assert r["mass_error"] < 1e-12, r
        assert r["mean_drift"] < 1e-5, r  # float32 models, float64 weights
        assert r["end"] < 0.5 * r["start"], r
        assert r["identical_after_end"], r
    assert sum(r["counters"]["messages_sent"] for r in results) == \
        sum(r["counters"]["messages_received"] for r in results) > 0
    assert all(r["counters"]["messages_received"] > 0 for r in results)


def test_async_exchange_on_one_shared_gpu():
    _check(run_gloo_on_one_gpu(_async_run, SHARED_RANKS, 100, timeout=300), "gloo")


@pytest.mark.skipif(WORLD < 2, reason="needs 2 or more GPUs (one NCCL rank per GPU)")
def test_async_exchange_beside_nccl():
    _check(run_nccl(_async_run, WORLD, 100, timeout=300), "nccl")
