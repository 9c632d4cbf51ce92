"""The invariants of async.md for the asynchronous exchange, on real gloo processes: mass, mean and consensus at
quiescent points, liveness under random per-step delays for every topology and several world sizes, speed of a slow
rank, a clean close, and a lost or hung peer named within the timeout."""

from __future__ import annotations

import os
import random
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipPeerError
from lightning_gossip.gossip.async_exchange import AsyncGossipExchange
from lightning_gossip.gossip.state import GossipState, gossiped_tensors
from lightning_gossip.gossip.topology import TOPOLOGIES
from tests.helpers.distributed import run_distributed


def _tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _state(rank: int, world_size: int, differ: bool = True) -> GossipState:
    torch.manual_seed(0)
    state = GossipState(gossiped_tensors(_tiny_model()), 1.0 / world_size)
    if differ:
        g = torch.Generator().manual_seed(100 + rank)
        with torch.no_grad():
            for t in state.tensors:
                t.copy_(torch.randn(t.shape, generator=g))
    return state


def _mass(state: GossipState) -> float:
    total = torch.tensor([state.weight], dtype=torch.float64)
    dist.all_reduce(total)
    return float(total.item())


def _sleep(rng: random.Random, max_sleep: float) -> None:
    if max_sleep > 0:
        time.sleep(rng.random() * max_sleep)


def _invariants(rank, world_size, steps, drain_every, p, max_sleep):
    """lr = 0: gossip alone, random per-step delays. Per topology: mass error, mean drift, distances, counts."""
    out = {}
    for topology in sorted(TOPOLOGIES):
        state = _state(rank, world_size)
        exchange = AsyncGossipExchange(state, p=p, topology=topology, seed=7)
        rng = random.Random(1000 * rank + 17)
        mean0, _ = state.weighted_mean()
        start = state.consensus_distance(mean0)
        mass_err, drift = 0.0, 0.0
        for step in range(steps):
            _sleep(rng, max_sleep)
            exchange.step(step)
            if (step + 1) % drain_every == 0:
                exchange.drain()
                assert not exchange.in_flight_messages()
                mass_err = max(mass_err, abs(_mass(state) - 1.0))
                mean, _ = state.weighted_mean()
                drift = max(drift, float((mean - mean0).abs().max()))
        exchange.drain()
        mass_err = max(mass_err, abs(_mass(state) - 1.0))
        mean1, _ = state.weighted_mean()
        end = state.consensus_distance(mean1)
        counters = exchange.counters
        counts = torch.tensor([counters.messages_sent, counters.messages_received, counters.sends_skipped])
        dist.all_reduce(counts)
        exchange.close()
        out[topology] = dict(
            mass_err=mass_err, drift=max(drift, float((mean1 - mean0).abs().max())), start=start, end=end,
            sent=int(counts[0]), received=int(counts[1]), skipped=int(counts[2]),
            receiver_alive=exchange.receiver_alive,
        )
    return out


def test_mass_mean_and_consensus_over_thousands_of_steps():
    # 0-0.5 ms per step stands in for compute, so sends are rarely skipped for want of a free buffer.
    results = run_distributed(_invariants, 4, 2000, 250, 0.5, 0.0005, timeout=240)
    for topology, r in results[0].items():
        assert r["mass_err"] < 1e-12, (topology, r)
        assert r["drift"] < 1e-5, (topology, r)  # float32 tensors: the mean moves by rounding only
        assert r["start"] > 1.0 and r["end"] < 1e-6 * r["start"], (topology, r)
        assert r["sent"] == r["received"] > 1000, (topology, r)  # nothing lost, nothing left in flight
    assert all(not r["receiver_alive"] for result in results for r in result.values())


@pytest.mark.parametrize("world_size", [2, 3, 5, 8])
def test_no_deadlock_or_lost_message_with_random_delays(world_size):
    # Each rank sleeps a random 0-2 ms per step, so ranks drift apart and messages cross in every order.
    results = run_distributed(_invariants, world_size, 120, 40, 0.5, 0.002, timeout=240)
    for topology, r in results[0].items():
        assert r["mass_err"] < 1e-12, (topology, r)
        assert r["drift"] < 1e-5, (topology, r)
        assert r["sent"] == r["received"] > 0, (topology, r)
        assert r["end"] < r["start"], (topology, r)


@pytest.mark.slow
def test_no_deadlock_or_lost_message_with_random_delays_16_ranks():
    results = run_distributed(_invariants, 16, 150, 50, 0.5, 0.003, timeout=600)
    for topology, r in results[0].items():
        assert r["mass_err"] < 1e-12, (topology, r)
        assert r["sent"] == r["received"] > 0, (topology, r)


def _nonfinite(rank, world_size, on_nonfinite):
    state = _state(rank, world_size)
    exchange = AsyncGossipExchange(state, p=1.0, topology="ring", seed=0, on_nonfinite=on_nonfinite)
    if rank == 0:
        with torch.no_grad():
            state.tensors[0].fill_(float("nan"))
    exchange.step(0)
    error = None
    try:
        exchange.drain()
    except Exception as caught:  # noqa: BLE001 - the test looks at it
        error = type(caught).__name__
    if error is None:
        mass = _mass(state)
    else:
        mass = None
    finite = all(bool(torch.isfinite(t).all()) for t in state.tensors)
    if error is None:
        exchange.close()
    return dict(error=error, mass=mass, finite=finite, rejected=exchange.counters.messages_rejected)


def test_a_nonfinite_message_is_rejected_and_its_weight_kept():
    results = run_distributed(_nonfinite, 2, "warn")
    assert results[1]["rejected"] == 1 and results[1]["finite"]
    assert abs(results[1]["mass"] - 1.0) < 1e-12


def _nonfinite_error(rank, world_size):
    state = _state(rank, world_size)
    exchange = AsyncGossipExchange(state, p=1.0, topology="ring", seed=0, on_nonfinite="error")
    if rank == 0:
        with torch.no_grad():
            state.tensors[0].fill_(float("inf"))
    try:
        # rank 0's message may already be there at rank 1's first step (rank 1 may start later): either step raises
        exchange.step(0)
        time.sleep(0.5)  # rank 0's message has arrived by now
        exchange.step(1)
    except Exception as caught:  # noqa: BLE001
        return type(caught).__name__
    return None


def test_a_nonfinite_message_raises_with_on_nonfinite_error():
    results = run_distributed(_nonfinite_error, 2)
    assert results[1] == "NonFiniteGossipError"


def _speed(rank, world_size, seconds, slow_rank, slowdown):
    state = _state(rank, world_size)
    exchange = AsyncGossipExchange(state, p=0.5, seed=1)
    base = 0.03  # long enough that a loaded machine's scheduling delays stay small beside it
    delay = base * (slowdown if rank == slow_rank else 1)
    dist.barrier()
    deadline = time.monotonic() + seconds
    steps = 0
    while time.monotonic() < deadline:
        time.sleep(delay)
        exchange.step(steps)
        steps += 1
    exchange.drain()
    mass = _mass(state)
    exchange.close()
    return steps, mass


def test_a_slow_rank_takes_about_k_times_fewer_steps_and_nobody_waits_for_it():
    k = 4
    results = run_distributed(_speed, 3, 4.0, 2, k, timeout=120)
    steps = [s for s, _ in results]
    fast = sum(steps[:2]) / 2
    # In lock-step every rank would take the slow rank's number of steps (ratio 1). Sleeping dominates a step; on a
    # loaded machine sleeps overshoot by a roughly constant amount, which narrows the ratio, hence the margin.
    assert fast / steps[2] > 0.5 * k, steps
    assert abs(results[0][1] - 1.0) < 1e-12


# -- a lost peer: killed, or hung ------------------------------------------------------------------------------------
def _lost_peer(rank, world_size, mode, timeout_s):
    state = _state(rank, world_size)
    exchange = AsyncGossipExchange(state, p=1.0, topology="random", seed=3, timeout=timedelta(seconds=timeout_s))
    for step in range(20):
        exchange.step(step)
    dist.barrier()
    if rank == 1:
        if mode == "killed":
            os._exit(0)  # no clean-up, no goodbye: as SIGKILL
        time.sleep(3600)  # hung: the process lives, its training loop never comes back
    start = time.monotonic()
    try:
        step = 20
        while time.monotonic() - start < 3 * timeout_s:
            exchange.step(step)
            step += 1
            time.sleep(0.01)
            if step == 40:
                exchange.drain()  # quiescence waits for rank 1, which never comes
        return ("no error", [], time.monotonic() - start)
    except GossipPeerError as error:
        exchange.close()
        return (str(error), error.peers, time.monotonic() - start)


@pytest.mark.parametrize("mode", ["killed", "hung"])
def test_a_lost_peer_is_named_within_the_timeout(mode, tmp_path):
    timeout_s = 4.0
    results = _run_tolerating_lost_rank(_lost_peer, 3, mode, timeout_s)
    for rank in (0, 2):
        text, peers, elapsed = results[rank]
        assert peers == [1], (rank, text)
        assert "rank 1" in text, text
        assert elapsed < timeout_s + 15, (rank, elapsed)


def _run_tolerating_lost_rank(fn, world_size, *args):
    """run_distributed for a test where rank 1 is lost: results of the other ranks; every process ends."""
    import torch.multiprocessing as mp

    from tests.helpers import distributed as dist_utils

    ctx = mp.get_context(dist_utils.START_METHOD)
    queue = ctx.SimpleQueue()
    context = mp.start_processes(
        dist_utils._worker, args=(world_size, dist_utils.free_port(), dist_utils.PG_TIMEOUT, "gloo", None, fn, args,
                                 queue),
        nprocs=world_size,
        join=False, start_method=dist_utils.START_METHOD,
    )
    results = {}
    deadline = time.monotonic() + 120
    try:
        while len(results) < world_size - 1 and time.monotonic() < deadline:
            if queue.empty():
                time.sleep(0.2)
                continue
            rank, status, value = queue.get()
            assert status == "ok", value
            import io

            results[rank] = torch.load(io.BytesIO(value), weights_only=False)
        # The survivors must also exit: no thread of the exchange keeps the interpreter alive.
        for rank in (r for r in range(world_size) if r != 1):
            context.processes[rank].join(timeout=max(1.0, deadline - time.monotonic()))
            assert not context.processes[rank].is_alive(), f"rank {rank} did not exit"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    assert sorted(results) == [r for r in range(world_size) if r != 1], results
    return results


# -- through the averager: the hand-written training loop of the docs -----------------------------------------------
def _averager_loop(rank, world_size, steps_by_rank):
    from lightning_gossip.gossip import GossipAverager

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    gossip = GossipAverager(model, p=0.5, asynchronous=True, seed=1)
    assert isinstance(gossip.exchange, AsyncGossipExchange)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps_by_rank[rank]):  # ranks take different numbers of steps: allowed, nobody waits
        x = torch.randn(16, 4, generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), (x.sum(1) > 0).long()).backward()
        opt.step()
        gossip.step()
    with gossip.consensus_swapped_in() as distance:  # a quiescent point inside: exact mean, then own weights back
        pass
    gossip.end()  # drain, exact consensus on every rank, close
    flat = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    threads = [t.name for t in threading.enumerate() if t.name.startswith("gossip-async")]
    return flat, gossip.weight, gossip.step_count, distance, gossip.exchange.receiver_alive, threads


def test_averager_with_asynchronous_true_allows_different_step_counts_and_ends_in_consensus():
    steps = [40, 25, 60]
    results = run_distributed(_averager_loop, 3, steps)
    for flat, weight, step_count, distance, alive, threads in results:
        assert torch.equal(flat, results[0][0])
        assert weight == pytest.approx(1 / 3, abs=1e-15)
        assert not alive  # end() stopped the receiver thread
        assert not threads  # ... and the send-completion thread: nothing of gossip outlives end()
        assert distance > 0
    assert [r[2] for r in results] == steps


def _subgroup(rank, world_size):
    from lightning_gossip.gossip import GossipAverager

    members = [1, 2, 3]
    group = dist.new_group(members)
    torch.manual_seed(rank)
    model = nn.Linear(4, 3)
    before = nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    if rank not in members:
        dist.barrier()
        return before, nn.utils.parameters_to_vector(model.parameters()).detach(), None
    gossip = GossipAverager(model, p=0.7, seed=2, group=group, asynchronous=True)
    for _ in range(30 + 10 * rank):
        gossip.step()
    gossip.end()
    dist.barrier()
    return before, nn.utils.parameters_to_vector(model.parameters()).detach(), gossip.weight


@pytest.mark.slow
def test_asynchronous_gossip_in_a_subgroup_leaves_the_rest_alone():
    results = run_distributed(_subgroup, 4)
    assert torch.equal(results[0][0], results[0][1])
    for _, after, weight in results[1:]:
        assert torch.equal(after, results[1][1]) and abs(weight - 1 / 3) < 1e-12
