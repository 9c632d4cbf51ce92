"""The NCCL path on real GPUs (marker ``gpu``; skipped without CUDA, so never part of the CPU runs).

With 2 or more GPUs (one rank per GPU, up to 8): the lock-step exchange keeps the mass (sum of gossip weights) at 1 to
float64 rounding and the weighted mean fixed (learning rate 0), and reaches consensus, blocking, overlapped and with
bounded staleness; bf16 on the wire halves the message and keeps the mass exact; the process group is bound to each
rank's GPU (``device_id``); the first exchange comes after a collective over all ranks (NCCL's rule for
``batch_isend_irecv``), also when resuming without the initial broadcast. With 1 GPU: a real Lightning ``Trainer``
fit with ``accelerator="gpu"``; with 2+, the same fit gossips across GPUs and ends on the consensus.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager
from tests.gpu.nccl import gpu_count, mass_and_mean, run_nccl
from tests.helpers.processes import run_script

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

REPO = Path(__file__).resolve().parents[2]
WORLD = min(gpu_count(), 8)
needs_two = pytest.mark.skipif(WORLD < 2, reason="needs 2 or more GPUs (one NCCL rank per GPU)")


def _model(rank: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Linear(128, 10)).cuda()
    return model


def _make_ranks_differ(averager: GossipAverager, rank: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(100 + rank)
    with torch.no_grad():
        for t in averager.state.tensors:
            t.copy_(torch.randn(t.shape, generator=g, device="cuda"))


def _invariants(rank: int, world_size: int, options: dict, steps: int) -> dict:
    averager = GossipAverager(_model(rank), p=0.5, seed=3, **options)
    bound = dist.distributed_c10d._get_default_group().bound_device_id
    _make_ranks_differ(averager, rank)
    mass0, mean0 = mass_and_mean(averager)
    start = averager.consensus_distance()
    mass_errors = [abs(mass0 - 1.0)]
    drift = 0.0
    for step in range(steps):
        averager.step()
        if step % 10 == 9:
            mass, mean = mass_and_mean(averager)
            mass_errors.append(abs(mass - 1.0))
            drift = max(drift, float((mean - mean0).abs().max()))
    end = averager.consensus_distance()
    averager.consensus_()
    flat = averager.state.flatten()
    everyone = [torch.empty_like(flat) for _ in range(world_size)]
    dist.all_gather(everyone, flat)
    return {
        "mass_error": max(mass_errors), "mean_drift": drift, "start": start, "end": end,
        "identical_after_consensus": all(torch.equal(everyone[0], t) for t in everyone),
        "bound_device": str(bound), "state_device": str(averager.state.device),
        "message_bytes": averager.state.message_bytes, "counters": averager.counters.as_dict(),
    }


@needs_two
@pytest.mark.parametrize("options", [{}, {"overlap": True}, {"staleness": 3}], ids=["blocking", "overlap", "stale3"])
def test_lock_step_exchange_keeps_mass_and_mean_and_reaches_consensus(options):
    results = run_nccl(_invariants, WORLD, options, 60)
    for rank, r in enumerate(results):
        assert r["mass_error"] < 1e-12, r
        assert r["mean_drift"] < 1e-5, r  # float32 models, float64 weights
        assert r["end"] < 1e-2 * r["start"], r
        assert r["identical_after_consensus"]
        assert r["bound_device"] == f"cuda:{rank}" and r["state_device"] == f"cuda:{rank}"
        assert r["counters"]["messages_sent"] > 0


@needs_two
def test_bf16_transfer_halves_the_message_and_keeps_the_mass():
    fp32 = run_nccl(_invariants, WORLD, {}, 30)
    bf16 = run_nccl(_invariants, WORLD, {"transfer_dtype": "bfloat16"}, 30)
    for r in bf16:
        assert r["mass_error"] < 1e-12, r  # the weight travels as float64 in the header
        assert r["mean_drift"] < 5e-2, r  # bf16 rounding of the mixed-in models only
        assert r["identical_after_consensus"]
    assert bf16[0]["message_bytes"] < 0.55 * fp32[0]["message_bytes"]


def _first_exchange_without_broadcast(rank: int, world_size: int) -> dict:
    # broadcast=False is the resume path: no initial broadcast, so the model check (all_gather_object over all
    # ranks) must be the collective that precedes the first two-rank batch_isend_irecv.
    averager = GossipAverager(_model(rank), p=1.0 / world_size, seed=5, broadcast=False)
    for _ in range(5):
        averager.step()
    averager.finish()
    return averager.counters.as_dict()


@needs_two
def test_first_exchange_after_a_collective_over_all_ranks_does_not_hang():
    results = run_nccl(_first_exchange_without_broadcast, WORLD, timeout=240)
    assert sum(r["messages_sent"] for r in results) == sum(r["messages_received"] for r in results) > 0


def test_trainer_fit_on_gpus(tmp_path):
    """A real Lightning Trainer fit with accelerator="gpu" (all GPUs, up to 8; one is enough to run it)."""
    devices = max(1, WORLD)
    run = run_script(Path(__file__).parent / "scripts" / "gpu_fit.py", [str(tmp_path), "--devices", str(devices)],
                     timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.output[-6000:]
    assert not run.survivors, f"processes left behind: {run.survivors}"
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(devices)]
    for rank, r in enumerate(ranks):
        assert r["device"] == f"cuda:{rank}" and r["steps"] > 0
        if devices > 1:
            assert r["backend"] == "nccl" and r["gossip_device"] == f"cuda:{rank}"
    if devices > 1:
        assert all(r["final_checksum"] == ranks[0]["final_checksum"] for r in ranks)  # the consensus on every GPU
        assert sum(r["counters"]["messages_sent"] for r in ranks) > 0


def test_benchmark_row_script_runs(tmp_path):
    out = tmp_path / "row.json"
    run = run_script(Path(__file__).parent / "bench_row.py",
                     ["--params", "1000000", "--steps", "20", "--warmup", "5", "--out", str(out)], timeout=600)
    assert run.returncode == 0, run.output[-6000:]
    row = json.loads(out.read_text())
    assert row["world_size"] == (WORLD if WORLD >= 2 else 2) and row["device"] and row["torch"]
    assert row["async_p0.1_ms"] > 0 and row["async_p1_bytes_per_step"] > 0  # one card is enough for these
    if WORLD >= 2:
        assert row["gossip_p0.1_ms"] > 0 and row["allreduce_ms"] > 0
    assert "| card |" in run.output
