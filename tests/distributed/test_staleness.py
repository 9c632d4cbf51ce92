"""Bounded-staleness exchange (``staleness=K``) on real gloo processes.

Oracle: the exchange the schedule plans for step t is mixed in after step t + K, in ascending sender order. A pure
Python replay of the schedule with that delay predicts every rank's gossip weight after every step exactly (the same
float64 halvings and additions in the same order), so a message mixed one step early or late, twice, or never fails.
"""

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager
from lightning_gossip.gossip.schedule import GossipSchedule
from lightning_gossip.gossip.topology import resolve_topology
from tests.helpers.distributed import run_distributed

P, SEED = 0.5, 7


def _model(rank: int) -> nn.Module:
    torch.manual_seed(rank)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _flat(averager: GossipAverager) -> torch.Tensor:
    return averager.state.flatten().clone()


def _train_step(averager: GossipAverager, rank: int, step: int) -> None:
    """A stand-in for an optimizer step: a deterministic per-rank, per-step update."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    with torch.no_grad():
        for t in averager.state.tensors:
            t.add_(torch.randn(t.shape, generator=g) * 0.05)


def replay_weights(world_size: int, steps: int, staleness: int) -> list[list[float]]:
    """Every rank's gossip weight after every step, by the rule "step t's messages are mixed after step t+K"."""
    schedule = GossipSchedule(world_size, P, resolve_topology("random"), SEED)
    weights = [1.0 / world_size] * world_size
    in_flight: list[tuple[int, int, int, float]] = []  # (step, sender, receiver, weight)
    history = []
    for t in range(steps):
        due = sorted(m for m in in_flight if t - m[0] >= staleness)
        in_flight = [m for m in in_flight if t - m[0] < staleness]
        for _, _, dst, w in due:
            weights[dst] += w
        plan = schedule.plan(t)
        posted = []
        for src, dst in enumerate(plan.sends):
            if dst is not None:
                weights[src] /= 2.0
                posted.append((t, src, dst, weights[src]))
        if staleness == 0:
            for _, _, dst, w in sorted(posted):
                weights[dst] += w
        else:
            in_flight += posted
        history.append(list(weights))
    return history


def _weights_mass_mean(rank: int, world_size: int, staleness: int, steps: int) -> dict:
    averager = GossipAverager(_model(rank), p=P, seed=SEED, staleness=staleness)
    with torch.no_grad():  # ranks start apart, so the mean and the consensus mean something
        for t in averager.state.tensors:
            t.add_(rank)
    mean0, _ = averager.weighted_mean()
    weights, masses, in_flight, drift = [], [], [], 0.0
    for _ in range(steps):
        averager.step()
        weights.append(averager.weight)
        in_flight.append(len(averager.exchange.pending))
        mass = torch.tensor([averager.weight + averager.in_flight_weight()], dtype=torch.float64)
        dist.all_reduce(mass)
        masses.append(float(mass))
        drift = max(drift, float((averager.weighted_mean()[0] - mean0).abs().max()))
    averager.consensus_()
    return {"weights": weights, "masses": masses, "in_flight": in_flight, "drift": drift, "final": _flat(averager),
            "final_weight": averager.weight, "counters": averager.counters.as_dict()}


@pytest.mark.parametrize("staleness", [0, 1, 3])
def test_messages_are_mixed_exactly_staleness_steps_later(staleness: int) -> None:
    world_size, steps = 3, 24
    out = run_distributed(_weights_mass_mean, world_size, staleness, steps)
    expected = replay_weights(world_size, steps, staleness)
    for rank, r in enumerate(out):
        assert r["weights"] == [row[rank] for row in expected]  # exact: every float64 halving and sum in order
        assert all(abs(m - 1.0) < 1e-12 for m in r["masses"])  # mass, messages in flight included
        assert r["drift"] < 1e-6  # gossip alone never moves the weighted mean
        assert max(r["in_flight"]) <= staleness  # never more than K exchanges pending between steps
        assert abs(r["final_weight"] - 1 / world_size) < 1e-12
        torch.testing.assert_close(r["final"], out[0]["final"], atol=0, rtol=0)  # exact consensus at the end
    if staleness:
        assert max(r["in_flight"][-1] for r in out) == staleness  # K exchanges were in flight at once
    # the replay is not trivially satisfied: with K > 0 the weights differ from the blocking replay
    assert staleness == 0 or expected != replay_weights(world_size, steps, 0)


def _periodic_average(rank: int, world_size: int, staleness: int, every: int, steps: int) -> dict:
    averager = GossipAverager(_model(rank), p=P, seed=SEED, staleness=staleness, average_every=every)
    after_average = []
    for step in range(steps):
        _train_step(averager, rank, step)
        averager.step()
        if averager.step_count % every == 0:
            after_average.append((averager.in_flight, averager.weight, _flat(averager)))
    return {"after_average": after_average}


def test_periodic_average_drains_every_exchange_in_flight() -> None:
    world_size, staleness, every = 3, 3, 5
    out = run_distributed(_periodic_average, world_size, staleness, every, 20)
    assert len(out[0]["after_average"]) == 4
    for r in out:
        for (in_flight, weight, flat), (_, _, flat0) in zip(r["after_average"], out[0]["after_average"]):
            assert not in_flight and abs(weight - 1 / world_size) < 1e-15
            assert torch.equal(flat, flat0)  # the exact average, on every rank


def _save_and_resume(rank: int, world_size: int, staleness: int, steps: int, stop_at: int) -> dict:
    # Uninterrupted run.
    averager = GossipAverager(_model(rank), p=P, seed=SEED, staleness=staleness)
    for step in range(steps):
        _train_step(averager, rank, step)
        averager.step()
    averager.finish()
    straight = (_flat(averager), averager.weight, averager.counters.as_dict())

    # The same run stopped after ``stop_at`` steps, saved through torch.save, and resumed into new objects.
    model = _model(rank)
    averager = GossipAverager(model, p=P, seed=SEED, staleness=staleness)
    for step in range(stop_at):
        _train_step(averager, rank, step)
        averager.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "gossip": averager.state_dict()}, buffer)
    saved = averager.state_dict()
    in_flight_at_save = [(step, src) for step, src, _ in saved["in_flight"]]
    # A checkpoint of another message size is refused with a clear error, before anything is mixed in.
    bad_size_error = None
    if saved["in_flight"]:
        truncated = {**saved, "in_flight": [(step, src, m[:-4]) for step, src, m in saved["in_flight"]]}
        try:
            fresh = GossipAverager(_model(rank), p=P, seed=SEED, staleness=staleness, broadcast=False)
            fresh.load_state_dict(truncated)
        except ValueError as error:
            bad_size_error = str(error)
    del averager, model
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model = _model(rank + 100)  # other initial weights: everything must come from the checkpoint
    model.load_state_dict(checkpoint["model"])
    averager = GossipAverager(model, p=P, seed=SEED, staleness=staleness, broadcast=False)
    averager.load_state_dict(checkpoint["gossip"])
    pending_after_load = [p.step for p in averager.exchange.pending]
    for step in range(stop_at, steps):
        _train_step(averager, rank, step)
        averager.step()
    averager.finish()
    resumed = (_flat(averager), averager.weight, averager.counters.as_dict())
    # The same checkpoint resumed with staleness 1: the saved messages are mixed in after the first step; the mass
    # (messages in flight included) stays 1 and every rank ends at the same consensus.
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    model = _model(rank)
    model.load_state_dict(checkpoint["model"])
    averager = GossipAverager(model, p=P, seed=SEED, staleness=1, broadcast=False)
    averager.load_state_dict(checkpoint["gossip"])
    masses = []
    for step in range(stop_at, steps):
        _train_step(averager, rank, step)
        averager.step()
        mass = torch.tensor([averager.weight + averager.in_flight_weight()], dtype=torch.float64)
        dist.all_reduce(mass)
        masses.append(float(mass))
    averager.consensus_()
    other_k = (_flat(averager), masses)
    return {"straight": straight, "resumed": resumed, "in_flight_at_save": in_flight_at_save,
            "pending_after_load": pending_after_load, "bad_size_error": bad_size_error, "other_k": other_k}


def test_resume_with_several_exchanges_in_flight_is_exact() -> None:
    staleness, steps, stop_at = 3, 20, 9
    out = run_distributed(_save_and_resume, 3, staleness, steps, stop_at)
    received = [entry for r in out for entry in r["in_flight_at_save"]]
    # the save held messages of more than one step in flight, all within the last K steps
    assert len({step for step, _ in received}) > 1
    assert all(stop_at - staleness <= step < stop_at for step, _ in received)
    for r in out:
        assert r["pending_after_load"] == sorted({step for step, _ in r["in_flight_at_save"]})
        assert torch.equal(r["resumed"][0], r["straight"][0])  # bitwise
        assert r["resumed"][1] == r["straight"][1]
        assert r["resumed"][2] == r["straight"][2]  # counters carried over
        assert all(abs(m - 1.0) < 1e-12 for m in r["other_k"][1])  # resumed with staleness 1: mass kept
        assert torch.equal(r["other_k"][0], out[0]["other_k"][0])  # and a consensus at the end
    errors = [r["bad_size_error"] for r in out if r["in_flight_at_save"]]
    assert errors and all("resume with the model, mix_buffers and transfer_dtype" in e for e in errors)


def _resume_with_another_seed(rank: int, world_size: int, steps: int, stop_at: int) -> dict:
    import warnings

    averager = GossipAverager(_model(rank), p=P, seed=SEED)
    for step in range(steps):
        _train_step(averager, rank, step)
        averager.step()
    averager.finish()
    straight = (_flat(averager), averager.weight)

    model = _model(rank)
    averager = GossipAverager(model, p=P, seed=SEED)
    for step in range(stop_at):
        _train_step(averager, rank, step)
        averager.step()
    checkpoint = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "gossip": averager.state_dict()}
    del averager, model
    model = _model(rank + 100)
    model.load_state_dict(checkpoint["model"])
    averager = GossipAverager(model, p=P, seed=SEED + 1, broadcast=False)  # the resumed run was given another seed
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        averager.load_state_dict(checkpoint["gossip"])
    for step in range(stop_at, steps):
        _train_step(averager, rank, step)
        averager.step()
    averager.finish()
    return {"straight": straight, "resumed": (_flat(averager), averager.weight),
            "warnings": [str(w.message) for w in caught]}


def test_resume_goes_on_with_the_checkpoint_schedule_seed() -> None:
    """The schedule's seed is part of the saved run: resumed with another seed configured, the run still goes on with
    the checkpoint's draws (exactly, bitwise), and rank 0 warns once that the configured seed was not used."""
    world_size, steps, stop_at = 3, 16, 6
    ours = GossipSchedule(world_size, P, resolve_topology("random"), SEED)
    theirs = GossipSchedule(world_size, P, resolve_topology("random"), SEED + 1)
    assert any(ours.plan(s) != theirs.plan(s) for s in range(stop_at, steps))  # the other seed would change the run
    out = run_distributed(_resume_with_another_seed, world_size, steps, stop_at)
    for r in out:
        assert torch.equal(r["resumed"][0], r["straight"][0]) and r["resumed"][1] == r["straight"][1]
    assert out[0]["warnings"] == [
        f"Resuming the gossip schedule with the checkpoint's seed {SEED} instead of this run's {SEED + 1}, so that "
        "training goes on as the saved run would have."
    ]
    assert all(r["warnings"] == [] for r in out[1:])
