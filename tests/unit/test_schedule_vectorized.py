"""The vectorised schedule gives the same plan, bit for bit, as the original pure-Python one (kept here as the
oracle), for the built-in topologies and for user topologies, at every world size and on both code paths."""

from __future__ import annotations

import math
import random
from typing import Optional

import numpy as np
import pytest

from lightning_gossip.gossip import schedule as sched
from lightning_gossip.gossip.schedule import GossipSchedule, StepPlan, uniform, uniform_all_ranks
from lightning_gossip.gossip.topology import Exponential, RandomPeer, Ring

_MASK64 = (1 << 64) - 1


# ---- the oracle: the schedule as it was before vectorisation, verbatim ------------------------------------------
def oracle_splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def oracle_uniform(seed: int, step: int, rank: int, stream: int) -> float:
    h = oracle_splitmix64(seed & _MASK64)
    for counter in (step, rank, stream):
        h = oracle_splitmix64(h ^ (counter & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


def oracle_plan(world_size: int, p: float, topology, seed: int, step: int) -> tuple[Optional[int], ...]:
    sends: list[Optional[int]] = [None] * world_size
    if world_size > 1 and p > 0.0:
        for rank in range(world_size):
            if oracle_uniform(seed, step, rank, 0) < p:
                u = oracle_uniform(seed, step, rank, 1)
                sends[rank] = topology.peer(rank, world_size, step, u)
    return tuple(sends)


# ---- user topologies: they must still get every sending rank's own u --------------------------------------------
class RecordingTopology:
    """Sends to a peer derived from u (so a wrong u changes the plan) and records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int, int, float]] = []

    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        self.calls.append((rank, world_size, step, u))
        return (rank + 1 + int(u * 1e6) % (world_size - 1)) % world_size


class SubclassedRandom(RandomPeer):
    """A subclass of a built-in that changes peer(): must take the generic path, not RandomPeer's vector code."""

    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        return (rank + world_size - 1) % world_size


def topologies():
    return [RandomPeer(), Ring(), Exponential(), RecordingTopology(), SubclassedRandom()]


SEEDS = [0, 1, 7, 12345, 2**63 + 11, 2**64 - 1, -3]
WORLDS = [1, 2, 3, 4, 5, 8, 16, 31, 32, 33, 64, 100, 257, 1024]
PS = [0.0, 1e-3, 0.01, 0.1, 0.37, 0.5, 0.999, 1.0]


def test_uniform_all_ranks_matches_the_oracle():
    for seed in SEEDS:
        for step in (0, 1, 5, 999, 2**40, 2**64 + 3):
            for stream in (0, 1, 2):
                fast = uniform_all_ranks(seed, step, 70, stream)
                assert fast.tolist() == [oracle_uniform(seed, step, r, stream) for r in range(70)]
                assert [uniform(seed, step, r, stream) for r in range(70)] == fast.tolist()


@pytest.mark.parametrize("world_size", WORLDS)
def test_both_paths_and_plan_match_the_oracle(world_size):
    rng = random.Random(world_size)
    for topology in topologies():
        for _ in range(12 if world_size < 256 else 4):
            seed = rng.choice(SEEDS)
            p = rng.choice(PS)
            schedule = GossipSchedule(world_size, p, topology, seed=seed)
            for step in [rng.randrange(0, 10**6) for _ in range(3)] + [0, 1, 2]:
                want = oracle_plan(world_size, p, topology, schedule.seed, step)
                for plan in (schedule._plan_python(step), schedule._plan_vectorized(step), schedule.plan(step)):
                    assert plan.sends == want, (type(topology).__name__, world_size, p, seed, step)
                    assert plan.step == step
                    assert plan.num_messages == sum(d is not None for d in want)
                    for rank in range(0, world_size, max(1, world_size // 17)):
                        assert plan.target_of(rank) == want[rank]
                        assert plan.sources_of(rank) == [s for s, d in enumerate(want) if d == rank]
                    assert all(isinstance(d, int) or d is None for d in plan.sends)  # Python ints, not numpy's


def test_user_topology_gets_each_sending_rank_its_own_u():
    world, p, seed, step = 300, 0.3, 5, 77
    topology = RecordingTopology()
    GossipSchedule(world, p, topology, seed=seed)._plan_vectorized(step)
    expected = [(r, world, step, oracle_uniform(seed, step, r, 1)) for r in range(world)
                if oracle_uniform(seed, step, r, 0) < p]
    assert topology.calls == expected and 60 < len(expected) < 120


def test_the_default_path_switches_at_the_threshold(monkeypatch):
    calls = []
    monkeypatch.setattr(GossipSchedule, "_plan_vectorized", lambda self, step: calls.append(step) or "vector")
    assert GossipSchedule(sched.VECTORIZE_FROM_WORLD_SIZE, 0.5, RandomPeer()).plan(3) == "vector"
    assert isinstance(GossipSchedule(sched.VECTORIZE_FROM_WORLD_SIZE - 1, 0.5, RandomPeer()).plan(3), StepPlan)
    assert calls == [3]


def test_step_plan_from_tuple_and_array_agree():
    a = StepPlan(4, (None, 2, 0, None))
    b = StepPlan(4, np.array([-1, 2, 0, -1]))
    assert a == b and hash(a) == hash(b) and a.sends == b.sends == (None, 2, 0, None)
    assert a.sources_of(0) == [2] and a.target_of(0) is None and a.num_messages == 2
    assert repr(b) == "StepPlan(step=4, sends=(None, 2, 0, None))"


def test_long_run_statistics_unchanged():
    """A guard against a subtly wrong vectorisation: the send rate at 1024 workers is p."""
    schedule = GossipSchedule(1024, 0.1, RandomPeer(), seed=3)
    rate = sum(schedule.plan(t).num_messages for t in range(50)) / (50 * 1024)
    assert math.isclose(rate, 0.1, abs_tol=0.01)
