"""Property tests over seeds, world sizes up to 64, p and the built-in topologies.

- Matching: every send has exactly one matching receive (``target_of`` and ``sources_of`` agree), nobody sends to
  itself or out of range, so no exchange can wait forever for a partner.
- Purity: the plan of step t is a function of (seed, step, p, topology, world size) only: independent schedule
  objects, any order of steps, and a fresh interpreter with another hash seed all compute the same plans.
- Mass: simulating the exchange math (GossipState.pack / mix / absorb_weight) on M in-memory workers over many steps,
  blocking or overlapped, with or without a worker whose weights are NaN, keeps sum_i a_i (plus messages in flight)
  at 1 within 1e-12, and gossip alone leaves the weighted mean of the finite workers where it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightning_gossip.gossip import GossipSchedule, GossipState, resolve_topology
from lightning_gossip.gossip.schedule import uniform

ROOT = Path(__file__).resolve().parents[2]
TOPOLOGIES = ["random", "ring", "exponential"]

seeds = st.integers(min_value=0, max_value=2**64 - 1)
world_sizes = st.integers(min_value=1, max_value=64)
probabilities = st.one_of(st.sampled_from([0.0, 1.0]), st.floats(min_value=0.0, max_value=1.0))
topologies = st.sampled_from(TOPOLOGIES)
steps = st.integers(min_value=0, max_value=2**40)

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SLOWER = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(seed=seeds, world_size=world_sizes, p=probabilities, topology=topologies, step=steps)
def test_every_send_has_exactly_one_matching_receive(seed, world_size, p, topology, step) -> None:
    plan = GossipSchedule(world_size, p, resolve_topology(topology), seed).plan(step)
    assert plan.step == step and len(plan.sends) == world_size
    receives = {rank: plan.sources_of(rank) for rank in range(world_size)}
    for rank, sources in receives.items():
        assert sources == sorted(sources)  # the order messages are mixed in, the same on every rank
        for src in sources:
            assert plan.target_of(src) == rank  # each posted receive has its send
    for src in range(world_size):
        target = plan.target_of(src)
        if target is None:
            assert all(src not in sources for sources in receives.values())
            continue
        assert 0 <= target < world_size and target != src  # never to itself, never out of range
        assert sum(src in sources for sources in receives.values()) == 1  # exactly one receive for each send
    assert sum(len(s) for s in receives.values()) == plan.num_messages
    if world_size == 1 or p == 0.0:
        assert plan.num_messages == 0
    elif p == 1.0:
        assert plan.num_messages == world_size


@FAST
@given(seed=seeds, world_size=world_sizes, p=probabilities, topology=topologies,
       step_list=st.lists(steps, min_size=1, max_size=8))
def test_schedule_is_a_pure_function_of_seed_and_step(seed, world_size, p, topology, step_list) -> None:
    a = GossipSchedule(world_size, p, resolve_topology(topology), seed)
    b = GossipSchedule(world_size, p, resolve_topology(topology), seed)
    forward = [a.plan(t) for t in step_list]
    backward = [b.plan(t) for t in reversed(step_list)][::-1]
    assert forward == backward
    assert [a.plan(t) for t in step_list] == forward  # recomputing changes nothing
    for t in step_list:
        for rank in range(min(world_size, 4)):
            u = uniform(seed, t, rank, 1)
            assert 0.0 <= u < 1.0 and u == uniform(seed, t, rank, 1)


CASES = [(seed, m, p, topology) for seed in (0, 7, 2**63 + 5) for m in (2, 3, 17, 64) for p in (0.1, 0.5, 1.0)
         for topology in TOPOLOGIES]


def plans_digest(cases: list, n_steps: int) -> str:
    digest = hashlib.sha256()
    for seed, m, p, topology in cases:
        schedule = GossipSchedule(m, p, resolve_topology(topology), seed)
        for t in range(n_steps):
            digest.update(repr(schedule.plan(t).sends).encode())
    return digest.hexdigest()


def test_schedule_is_identical_in_a_fresh_interpreter() -> None:
    """What another rank computes: a new process, another hash seed, only the gossip package imported."""
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from tests.reliability.test_properties import plans_digest
assert "lightning" not in sys.modules, "the algorithm imported Lightning"
print(plans_digest(json.loads(sys.argv[1]), 50))
"""
    env = {**os.environ, "PYTHONHASHSEED": "12345", "OMP_NUM_THREADS": "1"}
    other = subprocess.run(
        [sys.executable, "-c", code, json.dumps(CASES)], env=env, capture_output=True, text=True, timeout=120
    )
    assert other.returncode == 0, other.stderr[-3000:]
    assert other.stdout.strip() == plans_digest(CASES, 50)


# -- mass conservation: the exchange math of GossipState on in-memory workers ----------------------------------------
def make_workers(world_size: int, seed: int, nan_rank: int | None) -> list[GossipState]:
    g = torch.Generator().manual_seed(seed % 2**63)
    workers = []
    for rank in range(world_size):
        tensors = [torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(4, generator=g).double()]
        if rank == nan_rank:
            tensors[1][2] = float("nan")
        workers.append(GossipState(tensors, 1.0 / world_size))
    return workers


def weighted_mean(workers: list[GossipState], skip: int | None) -> torch.Tensor:
    num = sum(w.weight * w.flatten() for i, w in enumerate(workers) if i != skip)
    return num / sum(w.weight for i, w in enumerate(workers) if i != skip)


def simulate(workers, schedule, n_steps: int, overlap: bool, check) -> None:
    """GossipExchange.post/complete without the network: halve + pack for senders, mix in ascending source order.

    Overlap: messages posted at step t are mixed in at step t+1 (before t+1's own are posted), as GossipAverager does.
    A message with NaN/Inf is rejected: its weight absorbed, its tensors dropped.
    """
    in_flight: list[tuple[int, int, torch.Tensor]] = []  # (receiver, source, message)
    for t in range(n_steps):
        if overlap:
            deliver(workers, in_flight)
            in_flight = []
        plan = schedule.plan(t)
        posted = []
        for src, dst in enumerate(plan.sends):
            if dst is not None:
                workers[src].weight /= 2.0
                posted.append((dst, src, workers[src].pack(workers[src].new_message(), t, src)))
        if overlap:
            in_flight = posted
        else:
            deliver(workers, posted)
        check(t, in_flight)
    deliver(workers, in_flight)
    check(n_steps, [])


def deliver(workers, messages) -> None:
    for dst, src, message in sorted(messages, key=lambda m: (m[0], m[1])):
        weight, _, sender = GossipState.read_header(message)
        assert sender == src
        if workers[dst].payload_is_finite(message):
            workers[dst].mix(message, weight)
        else:
            workers[dst].absorb_weight(weight)


@SLOWER
@given(seed=seeds, world_size=st.integers(min_value=2, max_value=64), p=probabilities, topology=topologies,
       n_steps=st.integers(min_value=1, max_value=40), overlap=st.booleans(), poisoned=st.booleans())
def test_mass_is_conserved_and_gossip_keeps_the_mean(seed, world_size, p, topology, n_steps, overlap, poisoned) -> None:
    nan_rank = seed % world_size if poisoned else None
    workers = make_workers(world_size, seed, nan_rank)
    schedule = GossipSchedule(world_size, p, resolve_topology(topology), seed)
    mean0 = weighted_mean(workers, nan_rank)
    errors = []

    def check(t, in_flight) -> None:
        mass = sum(w.weight for w in workers) + sum(GossipState.read_header(m)[0] for _, _, m in in_flight)
        errors.append(abs(mass - 1.0))
        for rank, w in enumerate(workers):
            if rank != nan_rank:
                assert all(bool(torch.isfinite(x).all()) for x in w.tensors), f"rank {rank} poisoned at step {t}"

    simulate(workers, schedule, n_steps, overlap, check)
    assert max(errors) < 1e-12, max(errors)
    if nan_rank is None:
        # Gossip alone (no optimizer step) never moves the weighted mean.
        torch.testing.assert_close(weighted_mean(workers, None), mean0, rtol=0, atol=1e-12)
