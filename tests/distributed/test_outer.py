"""The outer optimizer through the averager on real gloo processes: every rank replayed against an oracle at every
outer step, mass, the consensus of (theta, phi, b), DiLoCo at two ranks, exact resume."""

import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip import GossipAverager
from lightning_gossip.gossip.outer import outer_update_, random_pairing
from tests.helpers.distributed import run_distributed

LR, MU = 0.7, 0.9


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


def _batches(rank: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1000 + rank)  # this rank's shard
    out = []
    for _ in range(steps):
        x = torch.randn(8, 4, generator=g)
        out.append((x, (x[:, 0] > x[:, 1]).long()))
    return out


def _train_step(model, opt, batch) -> None:
    opt.zero_grad()
    nn.functional.cross_entropy(model(batch[0]), batch[1]).backward()
    opt.step()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).clone()


def _gather(flat: torch.Tensor) -> list[torch.Tensor]:
    everyone = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(everyone, flat)
    return everyone


def _mean(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([x.double() for x in xs]).mean(0)


def _replay_against_oracle(rank, world_size, every, steps, nesterov):
    model = _model()
    averager = GossipAverager(model, p=0.0, seed=7, mix_buffers=False, outer_every=every, outer_lr=LR,
                              outer_momentum=MU, outer_nesterov=nesterov)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outer = averager.outer
    report = {"worst_rank_error": 0.0, "worst_mean_error": 0.0, "weights": set(), "outer_steps": 0}
    for t, batch in enumerate(_batches(rank, steps)):
        _train_step(model, opt, batch)
        thetas = _gather(_flat(model.parameters()))
        slows, bufs = _gather(_flat(outer.slow)), _gather(_flat(outer.buffer))
        averager.step()
        report["weights"].add(averager.weight)
        if (t + 1) % every:
            # no outer step: nothing moved (p = 0), the slow weights stay
            assert torch.equal(_flat(model.parameters()), thetas[rank]) and torch.equal(_flat(outer.slow), slows[rank])
            continue
        report["outer_steps"] += 1
        # the oracle: every rank's outer step from its own state, then each pair averages the new slow weights
        stepped = []
        for r in range(world_size):
            o_theta, o_slow, o_buf = [thetas[r].double()], [slows[r].double()], [bufs[r].double()]
            outer_update_(o_theta, o_slow, o_buf, LR, MU, nesterov)
            stepped.append((o_slow[0], o_buf[0]))
        partner = int(random_pairing(7, t, world_size)[rank])
        slow = stepped[rank][0] if partner < 0 else (stepped[rank][0] + stepped[partner][0]) / 2
        for mine, oracle in ((_flat(model.parameters()), slow), (_flat(outer.slow), slow),
                             (_flat(outer.buffer), stepped[rank][1])):
            report["worst_rank_error"] = max(report["worst_rank_error"], float((mine.double() - oracle).abs().max()))
        # The means over ranks (a_i = 1/M) follow DiLoCo's outer SGD with the mean pseudo-gradient exactly.
        new_slow, new_buf = _gather(_flat(outer.slow)), _gather(_flat(outer.buffer))
        delta = _mean(thetas) - _mean(slows)
        want_buf = MU * _mean(bufs) + delta
        want_slow = _mean(slows) + LR * ((delta + MU * want_buf) if nesterov else want_buf)
        report["worst_mean_error"] = max(report["worst_mean_error"], float((_mean(new_buf) - want_buf).abs().max()),
                                         float((_mean(new_slow) - want_slow).abs().max()))
    mass = torch.tensor([averager.weight], dtype=torch.float64)
    dist.all_reduce(mass)
    report["mass"] = float(mass)
    report["bytes_sent"] = averager.counters.bytes_sent
    report["message_bytes"] = averager.state.message_bytes
    return report


@pytest.mark.parametrize("world_size, nesterov", [(4, True), pytest.param(3, False, marks=pytest.mark.slow)])
def test_every_rank_follows_the_oracle_and_the_mean_follows_diloco(world_size, nesterov):
    every, steps = 3, 13
    for rank, report in enumerate(run_distributed(_replay_against_oracle, world_size, every, steps, nesterov)):
        assert report["outer_steps"] == steps // every
        assert report["worst_rank_error"] < 1e-6, report
        assert report["worst_mean_error"] < 1e-6, report
        assert report["weights"] == {1.0 / world_size}  # equal weights stay equal: pairs of equal weights
        assert abs(report["mass"] - 1.0) < 1e-12
        # one model per outer step, except the rounds this rank sat out (odd world size)
        sent = report["bytes_sent"] // report["message_bytes"]
        left_out = sum(random_pairing(7, t, world_size)[rank] < 0 for t in range(every - 1, steps, every))
        assert sent == steps // every - left_out


def _two_ranks_vs_diloco(rank, world_size, every, steps):
    """Two ranks always pair with each other: the method is DiLoCo (all-reduced pseudo-gradient, outer SGD)."""
    batches = _batches(rank, steps)
    model = _model()
    averager = GossipAverager(model, p=0.0, seed=1, outer_every=every, outer_lr=LR, outer_momentum=MU)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    reference = _model()
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    slow = [p.detach().clone().requires_grad_(True) for p in reference.parameters()]
    outer_opt = torch.optim.SGD(slow, lr=LR, momentum=MU, nesterov=True)
    for t, batch in enumerate(batches):
        _train_step(model, opt, batch)
        averager.step()
        _train_step(reference, ref_opt, batch)
        if (t + 1) % every == 0:
            for s, p in zip(slow, reference.parameters()):
                grad = s.detach() - p.detach()
                dist.all_reduce(grad)
                s.grad = grad / world_size
            outer_opt.step()
            with torch.no_grad():
                for s, p in zip(slow, reference.parameters()):
                    p.copy_(s)
    return _flat(model.parameters()), _flat(reference.parameters())


def test_two_ranks_are_diloco():
    results = run_distributed(_two_ranks_vs_diloco, 2, 4, 14)
    for gossip, diloco in results:
        assert torch.allclose(gossip, diloco, rtol=0, atol=1e-6), (gossip - diloco).abs().max()


def _save(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _resume_and_consensus(rank, world_size, every, steps, cut):
    """p > 0 between outer steps (weights become unequal), staleness 2 (messages in flight at the cut); a checkpoint
    at ``cut`` resumed exactly; consensus_()."""
    batches = _batches(rank, steps)

    def build(broadcast=True):
        model = _model()
        averager = GossipAverager(model, p=0.4, seed=3, outer_every=every, staleness=2, broadcast=broadcast)
        return model, averager, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, averager, opt = build()
    saved, in_flight_at_cut = None, False
    for t, batch in enumerate(batches):
        if t == cut:
            saved = _save({"model": model.state_dict(), "opt": opt.state_dict(), "gossip": averager.state_dict()})
            in_flight_at_cut = averager.in_flight  # the pairing posted at step cut - 1 lands after step cut + 1
        _train_step(model, opt, batch)
        averager.step()
    straight = (_flat(model.parameters()), _flat(averager.outer.slow), _flat(averager.outer.buffer), averager.weight)

    model2, averager2, opt2 = build(broadcast=False)
    state = torch.load(io.BytesIO(saved), weights_only=False)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["opt"])
    averager2.load_state_dict(state["gossip"])
    for batch in batches[cut:]:
        _train_step(model2, opt2, batch)
        averager2.step()
    resumed = (_flat(model2.parameters()), _flat(averager2.outer.slow), _flat(averager2.outer.buffer), averager2.weight)

    # consensus_(): every rank gets the a-weighted means of theta, phi and b, and weight 1/M
    averager.finish()  # the messages in flight home first (consensus_() does the same)
    home = (_flat(model.parameters()), _flat(averager.outer.slow), _flat(averager.outer.buffer))
    weight = averager.weight
    weighted = [_gather(torch.cat([x.double() * weight for x in home])), _gather(torch.tensor([weight]).double())]
    averager.consensus_()
    after = torch.cat([_flat(model.parameters()), _flat(averager.outer.slow), _flat(averager.outer.buffer)])
    expected = torch.stack(weighted[0]).sum(0) / torch.stack(weighted[1]).sum()
    return {"straight": straight, "resumed": resumed, "after": after, "expected": expected, "weight": averager.weight,
            "weight_before": weight, "in_flight_at_cut": in_flight_at_cut}


def test_resume_is_exact_and_consensus_puts_the_weighted_outer_state_on_every_rank():
    results = run_distributed(_resume_and_consensus, 3, 4, 19, 8)
    assert sum(r["in_flight_at_cut"] for r in results) >= 2  # the paired ranks' messages were saved in flight
    for r in results:
        for a, b in zip(r["straight"][:3], r["resumed"][:3]):
            assert torch.equal(a, b)
        assert r["straight"][3] == r["resumed"][3]
        assert torch.allclose(r["after"].double(), r["expected"], rtol=0, atol=1e-6)
        assert torch.equal(r["after"], results[0]["after"])  # one identical state on every rank
        assert r["weight"] == pytest.approx(1 / 3, abs=1e-15)
    assert len({r["weight_before"] for r in results}) > 1  # the inner gossip did make the weights unequal
    assert abs(sum(r["weight_before"] for r in results) - 1.0) < 1e-12


def _weighted_sums(averager) -> tuple[torch.Tensor, torch.Tensor, float]:
    """sum_i a_i theta_i and sum_i a_i phi_i over all ranks, messages in flight counted (each holds its sender's
    model right after an outer step, where model and slow weights are equal), and sum_i a_i."""
    n = sum(p.numel() for p in averager.outer.params)
    theta = _flat(averager.state.tensors).double() * averager.weight
    phi = _flat(averager.outer.slow).double() * averager.weight
    mass = averager.weight
    for message in averager.exchange.in_flight_messages():
        weight = averager.state.read_header(message)[0]
        payload = averager.state.payload(message).double()
        theta += weight * payload
        phi += weight * payload[:n]
        mass += weight
    total = torch.cat([theta, phi, torch.tensor([mass], dtype=torch.float64)])
    dist.all_reduce(total)
    return total[: theta.numel()], total[theta.numel(): theta.numel() + n], float(total[-1])


def _stale_pairings_conserve(rank, world_size, every, staleness, steps):
    model = _model()
    averager = GossipAverager(model, p=0.0, seed=5, outer_every=every, staleness=staleness, mix_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    worst, mixes = 0.0, 0
    for t, batch in enumerate(_batches(rank, steps)):
        _train_step(model, opt, batch)
        before = _weighted_sums(averager)
        landing = averager.in_flight
        averager.step()
        after = _weighted_sums(averager)
        assert abs(after[2] - 1.0) < 1e-12
        if (t + 1) % every:  # no outer step here: only gossip moved (a pairing landing K steps late)
            worst = max(worst, float((after[0] - before[0]).abs().max()), float((after[1] - before[1]).abs().max()))
            mixes += landing
    averager.finish()
    return worst, mixes


def test_stale_pairings_conserve_the_weighted_models_and_slow_weights():
    """staleness=2: each pairing is mixed in two steps after the outer step that posted it, into a model that has
    trained on since; the sum-weight mix into both model and slow weights leaves both weighted sums unchanged."""
    for worst, mixes in run_distributed(_stale_pairings_conserve, 4, 4, 2, 18):
        assert mixes >= 3 and worst < 1e-5, (worst, mixes)


def _asynchronous_accounting(rank, world_size, every):
    """Asynchronous mode, ranks of different speeds and step counts: every local change to a_i theta_i and
    a_i phi_i (inner steps, outer steps) is recorded; at quiescence the sums over ranks must have moved by exactly
    the recorded changes, i.e. the pushes, mixed whenever they arrived, moved neither sum."""
    import time

    model = _model()
    averager = GossipAverager(model, p=0.0, seed=2, outer_every=every, asynchronous=True, mix_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outer = averager.outer

    def theta() -> torch.Tensor:
        return _flat(outer.params).double()

    def phi() -> torch.Tensor:
        return _flat(outer.slow).double()

    start = torch.cat([averager.weight * theta(), averager.weight * phi()])
    moved = torch.zeros_like(start)
    n = start.numel() // 2
    outer_step = outer.step

    def recorded_outer_step() -> None:
        a, t0, p0 = averager.weight, theta(), phi()
        outer_step()
        moved[:n] += a * (theta() - t0)
        moved[n:] += a * (phi() - p0)

    outer.step = recorded_outer_step
    for batch in _batches(rank, 20 + 3 * rank):
        t0 = theta()
        _train_step(model, opt, batch)
        moved[:n] += averager.weight * (theta() - t0)
        averager.step()
        time.sleep(0.003 * rank)  # ranks of different speeds: pushes land mid-round, at any step
    averager.finish()
    assert averager.verifier is not None and averager.verifier.checks >= 1  # the slow-weight ledger was checked
    end = torch.cat([averager.weight * theta(), averager.weight * phi()])
    totals = torch.cat([start, end, moved, torch.tensor([averager.weight], dtype=torch.float64)])
    dist.all_reduce(totals)
    received = averager.counters.messages_received
    averager.end(consensus=False)
    s, e, m = totals[: 2 * n], totals[2 * n: 4 * n], totals[4 * n: 6 * n]
    return float(((e - s) - m).abs().max()), float(totals[-1]), received


def test_asynchronous_pushes_conserve_the_weighted_models_and_slow_weights():
    results = run_distributed(_asynchronous_accounting, 3, 4)
    for error, mass, _ in results:
        assert error < 1e-5 and abs(mass - 1.0) < 1e-12, (error, mass)
    assert sum(received for _, _, received in results) >= 5


def _asynchronous_checker_and_resume(rank, world_size, every):
    """The invariant checker's slow-weight check in the asynchronous mode: it passes at a cut of a sound run, and
    names "slow weights" on every rank when one rank mixes marked messages into its model only. A checkpoint taken at
    a cut restores theta, phi, the outer momentum and a_i bit for bit into a fresh averager, whose next cut checks."""
    import time

    from lightning_gossip.gossip.errors import GossipInvariantError
    from lightning_gossip.gossip.state import GossipState

    model = _model()
    averager = GossipAverager(model, p=0.0, seed=3, outer_every=every, asynchronous=True, mix_buffers=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def run(steps):
        for batch in _batches(rank, steps):
            _train_step(model, opt, batch)
            averager.step()
            time.sleep(0.002 * rank)

    run(12 + 2 * rank)
    state = averager.checkpoint_state_dict()  # a cut: the checker runs here
    checks = averager.verifier.checks
    saved = (_flat(averager.outer.params), _flat(averager.outer.slow), _flat(averager.outer.buffer), averager.weight)
    blob = _save({"gossip": state, "model": model.state_dict()})
    resumed_model = _model()
    resumed = GossipAverager(resumed_model, p=0.0, seed=3, outer_every=every, asynchronous=True, mix_buffers=False,
                             broadcast=False)
    loaded = torch.load(io.BytesIO(blob), weights_only=False)
    resumed_model.load_state_dict(loaded["model"])
    resumed.load_state_dict(loaded["gossip"])
    exact = (torch.equal(_flat(resumed.outer.params), saved[0]) and torch.equal(_flat(resumed.outer.slow), saved[1])
             and torch.equal(_flat(resumed.outer.buffer), saved[2]) and resumed.weight == saved[3])
    resumed.cut("the resumed run's first cut")  # re-bases the ledger (a resume sets phi from outside gossip)
    averager.end(consensus=False)
    # the resumed run trains on, then one rank drops the slow-weight half of every marked mix
    model, averager, opt = resumed_model, resumed, torch.optim.SGD(resumed_model.parameters(), lr=0.1)
    run(10)
    averager.cut("a sound cut")
    if rank == 1:
        averager.state.mix = lambda message, weight: GossipState.mix(averager.state, message, weight)
    run(12)
    caught = None
    try:
        averager.cut("a cut after a broken mix")
    except GossipInvariantError as error:
        caught = (error.invariant, str(error))
    received = averager.counters.messages_received
    averager.exchange.close()
    return checks, exact, caught, received


def test_asynchronous_checker_checks_the_slow_weights_and_resume_restores_the_outer_state():
    results = run_distributed(_asynchronous_checker_and_resume, 3, 2, timeout=240)
    assert sum(received for *_, received in results) >= 3
    for checks, exact, caught, _ in results:
        assert checks >= 1 and exact
        assert caught is not None and caught[0] == "slow weights" and "not into the slow weights" in caught[1], caught
