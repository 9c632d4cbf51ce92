"""The shared schedule and the topologies: pure functions, checked in one process."""

import math

import pytest

from lightning_gossip.gossip.schedule import GossipSchedule, check_probability, uniform
from lightning_gossip.gossip.topology import (
    TOPOLOGIES,
    Exponential,
    RandomPeer,
    Ring,
    resolve_topology,
    validate_topology,
)


def test_uniform_is_a_pure_function_in_unit_interval():
    draws = [uniform(3, step, rank, 0) for step in range(200) for rank in range(8)]
    assert draws == [uniform(3, step, rank, 0) for step in range(200) for rank in range(8)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert len(set(draws)) == len(draws)  # no collisions between counters
    assert abs(sum(draws) / len(draws) - 0.5) < 0.03
    assert uniform(4, 0, 0, 0) != uniform(3, 0, 0, 0)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_sender_frequency_matches_p(p):
    schedule = GossipSchedule(8, p, RandomPeer(), seed=11)
    sends = sum(schedule.plan(step).num_messages for step in range(2000))
    expected = p * 8 * 2000
    # binomial standard deviation; 5 sigma keeps the test deterministic in practice and still strict
    assert abs(sends - expected) < 5 * math.sqrt(expected * (1 - p))


def test_p_zero_and_one_and_single_worker():
    assert GossipSchedule(4, 0.0, RandomPeer()).plan(5).num_messages == 0
    assert GossipSchedule(4, 1.0, RandomPeer()).plan(5).num_messages == 4
    assert GossipSchedule(1, 1.0, RandomPeer()).plan(5).num_messages == 0


@pytest.mark.parametrize("name", sorted(TOPOLOGIES))
@pytest.mark.parametrize("world_size", [2, 3, 5, 8, 13])
def test_every_send_has_one_receiver_and_nobody_sends_to_itself(name, world_size):
    schedule = GossipSchedule(world_size, 0.7, resolve_topology(name), seed=2)
    for step in range(100):
        plan = schedule.plan(step)
        for rank in range(world_size):
            target = plan.target_of(rank)
            if target is not None:
                assert target != rank and 0 <= target < world_size
                assert rank in plan.sources_of(target)
        received = sum(len(plan.sources_of(r)) for r in range(world_size))
        assert received == plan.num_messages


def test_random_peer_is_uniform_over_the_others():
    topology = RandomPeer()
    counts = [0] * 5
    for i in range(5000):
        counts[topology.peer(2, 5, 0, uniform(0, i, 2, 1))] += 1
    assert counts[2] == 0
    assert all(abs(c - 1250) < 150 for i, c in enumerate(counts) if i != 2)
    assert topology.peer(0, 4, 0, 0.999999999) == 3 and topology.peer(3, 4, 0, 0.0) == 0


def test_ring_and_exponential_peers():
    assert [Ring().peer(r, 4, 0, 0.5) for r in range(4)] == [1, 2, 3, 0]
    # 8 workers: offsets 1, 2, 4, then back to 1
    assert [Exponential().peer(0, 8, t, 0.5) for t in range(4)] == [1, 2, 4, 1]
    # 6 workers: K = ceil(log2 6) = 3 offsets 1, 2, 4
    assert [Exponential().peer(5, 6, t, 0.5) for t in range(3)] == [0, 1, 3]


def test_same_seed_same_schedule_different_seed_different_schedule():
    a = [GossipSchedule(6, 0.5, RandomPeer(), seed=1).plan(t).sends for t in range(50)]
    b = [GossipSchedule(6, 0.5, RandomPeer(), seed=1).plan(t).sends for t in range(50)]
    c = [GossipSchedule(6, 0.5, RandomPeer(), seed=2).plan(t).sends for t in range(50)]
    assert a == b and a != c


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), float("inf")])
def test_probability_out_of_range_names_value_and_range(bad):
    with pytest.raises(ValueError, match=r"\[0, 1\]") as info:
        check_probability(bad)
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize("bad", ["0.1", None, True, [0.1]])
def test_probability_not_a_number(bad):
    with pytest.raises(TypeError, match="must be a number in"):
        check_probability(bad)


def test_unknown_topology_lists_the_choices():
    with pytest.raises(ValueError, match="'star'.*exponential.*random.*ring"):
        resolve_topology("star")
    with pytest.raises(TypeError, match="peer"):
        resolve_topology(42)


class _SendsToZero:
    def peer(self, rank, world_size, step, u):
        return 0


def test_user_topology_that_does_not_fit_fails_with_the_offending_values():
    with pytest.raises(ValueError, match="rank 0 at step 0 would send to 0"):
        validate_topology(_SendsToZero(), 4)
    validate_topology(Ring(), 2)
    validate_topology(_SendsToZero(), 1)  # a single worker never gossips


class _HalfRing:
    """A user topology: a fixed pairing that only works for an even number of workers."""

    def peer(self, rank, world_size, step, u):
        return rank ^ 1

    def validate(self, world_size):
        if world_size % 2:
            raise ValueError(f"_HalfRing needs an even world size, got {world_size}")


def test_user_topology_own_validate_is_called():
    validate_topology(_HalfRing(), 4)
    with pytest.raises(ValueError, match="even world size, got 5"):
        validate_topology(_HalfRing(), 5)


class BreaksLate:
    """Valid for the 64 steps that setup probes, then sends rank 3 to itself: every rank must refuse it at once."""

    def peer(self, rank: int, world_size: int, step: int, u: float) -> int:
        if step >= 100 and rank == 3:
            return 3
        return (rank + 1) % world_size


@pytest.mark.parametrize("world_size", [4, 64])  # the per-rank path and the vectorised one
def test_a_topology_that_breaks_after_setup_fails_at_that_step_on_every_rank(world_size):
    from lightning_gossip.gossip import GossipSchedule
    from lightning_gossip.gossip.topology import validate_topology

    validate_topology(BreaksLate(), world_size)  # passes: the first 64 steps are fine
    schedule = GossipSchedule(world_size, 1.0, BreaksLate(), seed=0)
    schedule.plan(99)
    with pytest.raises(ValueError, match="rank 3 at step 100 would send to 3"):
        schedule.plan(100)
