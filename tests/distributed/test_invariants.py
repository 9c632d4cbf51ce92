"""The invariants of gosgd.md, checked on real gloo processes: mass, mean, consensus, p = 0, volume, determinism,
no deadlock."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager
from lightning_gossip.gossip.topology import TOPOLOGIES
from tests.helpers.distributed import run_distributed


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _make_ranks_differ(averager: GossipAverager, rank: int) -> None:
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for t in averager.state.tensors:
            t.copy_(torch.randn(t.shape, generator=g))


def _global_mass(averager: GossipAverager) -> float:
    mass = torch.tensor([averager.weight + averager.in_flight_weight()], dtype=torch.float64)
    dist.all_reduce(mass)
    return float(mass.item())


def _mass_mean_consensus(rank, world_size, steps):
    """lr = 0: gossip alone. Returns per (topology, overlap): max mass error, mean drift, distances."""
    out = {}
    for topology in sorted(TOPOLOGIES):
        for overlap in (False, True):
            torch.manual_seed(0)
            model = _tiny_model()
            averager = GossipAverager(model, p=0.5, topology=topology, seed=3, overlap=overlap)
            _make_ranks_differ(averager, rank)
            mean0, _ = averager.weighted_mean()
            start = averager.consensus_distance()
            mass_err = 0.0
            for _ in range(steps):
                averager.step()
                mass_err = max(mass_err, abs(_global_mass(averager) - 1.0))
            mean1, _ = averager.weighted_mean()
            end = averager.consensus_distance()
            averager.finish()
            mass_err = max(mass_err, abs(_global_mass(averager) - 1.0))
            out[(topology, overlap)] = (mass_err, float((mean1 - mean0).abs().max()), start, end)
    return out


@pytest.mark.parametrize("world_size", [4])
def test_mass_is_conserved_mean_is_fixed_and_ranks_reach_consensus(world_size):
    results = run_distributed(_mass_mean_consensus, world_size, 60)
    for key, (mass_err, drift, start, end) in results[0].items():
        assert mass_err < 1e-12, (key, mass_err)
        assert drift < 1e-5, (key, drift)
        assert start > 1.0 and end < 1e-3 * start, (key, start, end)
    assert results[0] == results[1]  # every rank sees the same global figures


def _train_on_own_shard(rank, world_size, p, seed, steps, use_gossip=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    averager = GossipAverager(model, p=p, seed=seed) if use_gossip else None
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1000 + rank)  # this rank's shard
    for _ in range(steps):
        x = torch.randn(16, 4, generator=g)
        y = (x.sum(1) > 0).long()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if averager is not None:
            averager.step()
    flat = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    return flat, (averager.counters.as_dict() if averager else None), (averager.state.message_bytes if averager else 0)


def _p_zero_vs_single_process(rank, world_size, steps):
    gossip, counters, _ = _train_on_own_shard(rank, world_size, 0.0, 0, steps)
    alone, _, _ = _train_on_own_shard(rank, world_size, 0.0, 0, steps, use_gossip=False)
    return gossip, alone, counters


def test_p_zero_sends_nothing_and_equals_single_process_training_on_the_shard():
    results = run_distributed(_p_zero_vs_single_process, 3, 25)
    for gossip, alone, counters in results:
        assert torch.equal(gossip, alone)
        assert counters["bytes_sent"] == 0 and counters["messages_sent"] == 0 and counters["bytes_received"] == 0
    assert not torch.equal(results[0][0], results[1][0])  # shards differ, so models differ


def _volume(rank, world_size, p, steps):
    _, counters, message_bytes = _train_on_own_shard(rank, world_size, p, 5, steps)
    return counters, message_bytes


def test_bytes_sent_per_step_is_about_p_times_the_message():
    p, steps = 0.5, 300
    results = run_distributed(_volume, 3, p, steps)
    for counters, message_bytes in results:
        per_step = counters["bytes_sent"] / steps
        assert abs(per_step - p * message_bytes) < 0.2 * p * message_bytes
        assert counters["bytes_sent"] == counters["messages_sent"] * message_bytes
    assert sum(c["messages_sent"] for c, _ in results) == sum(c["messages_received"] for c, _ in results)


def _determinism(rank, world_size):
    # Three runs on one process group: the same seed twice, then another seed.
    return [_train_on_own_shard(rank, world_size, 0.5, seed, 30)[0] for seed in (1, 1, 2)]


def test_same_seed_same_weights_run_to_run():
    for first, second, other_seed in run_distributed(_determinism, 3):
        assert torch.equal(first, second)
        assert not torch.equal(first, other_seed)


def _no_deadlock(rank, world_size):
    """Many seeds, p and topologies on one process group: every send must meet its receive."""
    done = 0
    for topology in sorted(TOPOLOGIES):
        for p in (0.1, 0.5, 1.0):
            for seed in range(4):
                for overlap in (False, True):
                    averager = GossipAverager(
                        nn.Linear(3, 2), p=p, topology=topology, seed=seed, overlap=overlap, broadcast=seed == 0
                    )
                    for _ in range(12):
                        averager.step()
                    averager.finish()
                    done += averager.counters.steps
    return done


@pytest.mark.parametrize("world_size", [2, 5])
def test_no_deadlock_for_many_seeds_world_sizes_and_topologies(world_size):
    results = run_distributed(_no_deadlock, world_size, timeout=180)
    assert results == [3 * 3 * 4 * 2 * 12] * world_size


def _periodic_average_and_bf16(rank, world_size):
    model = _tiny_model()
    averager = GossipAverager(model, p=0.0, average_every=5, transfer_dtype="bfloat16")
    _make_ranks_differ(averager, rank)
    for _ in range(4):
        averager.step()
    before = averager.consensus_distance()
    averager.step()  # the 5th step averages exactly
    after = averager.consensus_distance()
    bf16 = GossipAverager(_tiny_model(), p=1.0, transfer_dtype="bfloat16")
    fp32 = GossipAverager(_tiny_model(), p=1.0)
    bf16.step()
    fp32.step()
    return before, after, bf16.counters.bytes_sent, fp32.counters.bytes_sent, bf16.counters.messages_sent


def test_periodic_exact_average_and_bf16_transfer():
    for before, after, bf16_bytes, fp32_bytes, bf16_messages in run_distributed(_periodic_average_and_bf16, 3):
        assert before > 0.1 and after < 1e-10
        assert bf16_messages == 1  # p = 1: every rank sent once, with half the payload bytes
        assert bf16_bytes < 0.6 * fp32_bytes
