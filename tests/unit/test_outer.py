"""The outer optimizer's rules (lightning_gossip/gossip/outer.py) against plain-Python oracles, on one process."""

import itertools
import random
from collections import Counter

import numpy as np
import pytest
import torch

from lightning_gossip.gossip import GossipOptions, GossipSchedule, RandomPeer
from lightning_gossip.gossip.outer import OuterOptimizer, OuterSchedule, outer_update_, random_pairing


# -- the pairing ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 16, 33])
def test_pairing_is_a_matching_with_at_most_one_rank_left_out(world_size):
    for step in range(50):
        partner = random_pairing(5, step, world_size)
        unpaired = [r for r in range(world_size) if partner[r] < 0]
        assert len(unpaired) == world_size % 2
        for r in range(world_size):
            if partner[r] >= 0:
                assert partner[r] != r and partner[partner[r]] == r
        assert np.array_equal(partner, random_pairing(5, step, world_size))  # a pure function of its arguments


def test_pairing_is_uniform_over_matchings_and_differs_by_seed_and_step():
    # 4 ranks have 3 perfect matchings; each should come up about a third of the time
    seen = Counter(tuple(random_pairing(1, step, 4).tolist()) for step in range(3000))
    assert len(seen) == 3
    assert all(abs(count / 3000 - 1 / 3) < 0.04 for count in seen.values()), seen
    # every rank is left out equally often with an odd number of ranks
    left = Counter(int(np.flatnonzero(random_pairing(2, step, 5) < 0)[0]) for step in range(2500))
    assert all(abs(count / 2500 - 0.2) < 0.04 for count in left.values()), left
    assert not np.array_equal(random_pairing(1, 7, 16), random_pairing(2, 7, 16))


def test_outer_schedule_pairs_on_outer_steps_and_follows_the_gossip_schedule_otherwise():
    inner = GossipSchedule(6, 0.3, RandomPeer(), seed=4)
    schedule = OuterSchedule(inner, every=5)
    for step in range(30):
        plan = schedule.plan(step)
        if (step + 1) % 5 == 0:
            assert plan.sends == tuple(random_pairing(4, step, 6).tolist())
        else:
            assert plan == inner.plan(step)
    schedule.seed = 9  # a resume sets the checkpoint's seed through the outer schedule
    assert inner.seed == 9 and schedule.plan(4).sends == tuple(random_pairing(9, 4, 6).tolist())


# -- the update rule ------------------------------------------------------------------------------------------------
def _oracle(theta, slow, buf, lr, mu, nesterov):
    """The outer step on lists of Python floats."""
    new_slow, new_buf = [], []
    for t, s, b in zip(theta, slow, buf):
        d = t - s
        b = mu * b + d
        s = s + lr * ((d + mu * b) if nesterov else b)
        new_slow.append(s)
        new_buf.append(b)
    return list(new_slow), new_slow, new_buf


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_update_matches_a_plain_python_oracle(nesterov):
    rng = random.Random(0)
    n, lr, mu = 7, 0.7, 0.9
    theta = torch.tensor([rng.gauss(0, 1) for _ in range(n)], dtype=torch.float64)
    slow, buf = theta.clone(), torch.zeros(n, dtype=torch.float64)
    o_theta, o_slow, o_buf = theta.tolist(), theta.tolist(), [0.0] * n
    for _ in range(6):
        step = [rng.gauss(0, 0.3) for _ in range(n)]  # what the inner steps moved
        theta += torch.tensor(step, dtype=torch.float64)
        o_theta = [t + s for t, s in zip(o_theta, step)]
        outer_update_([theta], [slow], [buf], lr, mu, nesterov)
        o_theta, o_slow, o_buf = _oracle(o_theta, o_slow, o_buf, lr, mu, nesterov)
        assert torch.allclose(theta, torch.tensor(o_theta, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.allclose(slow, torch.tensor(o_slow, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.allclose(buf, torch.tensor(o_buf, dtype=torch.float64), rtol=0, atol=1e-12)
        assert torch.equal(theta, slow)  # the model restarts from the slow weights


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_update_is_torch_sgd_on_diloco_pseudo_gradient_bit_for_bit(nesterov):
    """DiLoCo's outer step: SGD on phi with grad = phi - theta (torchft's ``_save_grads``)."""
    torch.manual_seed(0)
    shapes = [(5, 3), (3,)]
    theta = [torch.randn(s) for s in shapes]
    slow, buf = [t.clone() for t in theta], [torch.zeros(s) for s in shapes]
    reference = [torch.nn.Parameter(t.clone()) for t in theta]
    sgd = torch.optim.SGD(reference, lr=0.7, momentum=0.9, nesterov=nesterov)
    for _ in range(5):
        for t in theta:
            t.add_(torch.randn(t.shape) * 0.1)
        local = [t.clone() for t in theta]  # the workers' fast weights before the outer step
        outer_update_(theta, slow, buf, 0.7, 0.9, nesterov)
        for p, t in zip(reference, local):
            p.grad = p.detach() - t
        sgd.step()
        for p, s in zip(reference, slow):
            assert torch.equal(p.detach(), s)
        theta = [p.detach().clone() for p in reference]


def test_pair_averaging_then_outer_step_is_noloco_with_half_the_bytes():
    """NoLoCo's code: each pair averages phi and d = theta - phi, then m <- alpha m + gamma mean(d) + gamma (mean(phi)
    - phi_i), phi_i <- phi_i + m, theta_i <- phi_i. Ours averages only theta, then the heavy-ball outer step."""
    rng = random.Random(1)
    world, n, gamma, alpha = 4, 3, 0.7, 0.5
    # NoLoCo's state per rank, as Python floats
    phi = [[rng.gauss(0, 1) for _ in range(n)] for _ in range(world)]
    theta = [list(p) for p in phi]
    m = [[0.0] * n for _ in range(world)]
    # ours, as tensors
    o_phi = [torch.tensor(p, dtype=torch.float64) for p in phi]
    o_theta = [p.clone() for p in o_phi]
    o_buf = [torch.zeros(n, dtype=torch.float64) for _ in range(world)]
    for rnd in range(8):
        for r in range(world):  # the inner steps: every rank moves on its own
            step = [rng.gauss(0, 0.2) for _ in range(n)]
            theta[r] = [t + s for t, s in zip(theta[r], step)]
            o_theta[r] += torch.tensor(step, dtype=torch.float64)
        partner = random_pairing(3, rnd, world)
        new_phi, new_m = [], []
        for r in range(world):  # NoLoCo, literally
            q = int(partner[r])
            mean_phi = [(a + b) / 2 for a, b in zip(phi[r], phi[q])]
            mean_d = [((ta - pa) + (tb - pb)) / 2 for ta, pa, tb, pb in zip(theta[r], phi[r], theta[q], phi[q])]
            mm = [alpha * mi + gamma * d + gamma * (mp - pi) for mi, d, mp, pi in zip(m[r], mean_d, mean_phi, phi[r])]
            new_m.append(mm)
            new_phi.append([pi + mi for pi, mi in zip(phi[r], mm)])
        phi, m, theta = new_phi, new_m, [list(p) for p in new_phi]
        mixed = [(o_theta[r] + o_theta[int(partner[r])]) / 2 for r in range(world)]  # ours: one model per rank
        for r in range(world):
            o_theta[r] = mixed[r]
            outer_update_([o_theta[r]], [o_phi[r]], [o_buf[r]], gamma, alpha, nesterov=False)
        for r in range(world):
            assert torch.allclose(o_phi[r], torch.tensor(phi[r], dtype=torch.float64), rtol=0, atol=1e-12)
            assert torch.allclose(o_buf[r] * gamma, torch.tensor(m[r], dtype=torch.float64), rtol=0, atol=1e-12)


def test_lr_one_without_momentum_is_plain_averaging():
    theta = [torch.tensor([1.0, 2.0])]
    slow, buf = [torch.tensor([0.0, 0.0])], [torch.zeros(2)]
    outer_update_(theta, slow, buf, 1.0, 0.0, nesterov=True)
    assert torch.equal(slow[0], torch.tensor([1.0, 2.0])) and torch.equal(theta[0], slow[0])


# -- the optimizer object -------------------------------------------------------------------------------------------
def test_outer_optimizer_state_round_trip_restart_and_size_check():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    outer = OuterOptimizer.for_module(model, GossipOptions(outer_every=4, outer_lr=0.5, outer_momentum=0.8))
    assert len(outer.params) == 4  # the parameters only, not BatchNorm's running statistics
    assert outer.for_module(model, GossipOptions()) is None
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    outer.step()
    saved = outer.state_dict()
    assert saved["slow"].numel() == sum(p.numel() for p in model.parameters())
    other = OuterOptimizer.for_module(model, GossipOptions(outer_every=4))
    other.load_state_dict(saved)
    for a, b in itertools.chain(zip(other.slow, outer.slow), zip(other.buffer, outer.buffer)):
        assert torch.equal(a, b)
    other.restart()
    assert all(torch.equal(s, p) for s, p in zip(other.slow, model.parameters()))
    assert all(not b.any() for b in other.buffer)
    with pytest.raises(ValueError, match="has 3 elements"):
        other.load_state_dict({"slow": torch.zeros(3), "momentum": torch.zeros(3)})
    assert [outer.due(k) for k in range(1, 9)] == [False, False, False, True] * 2


def test_outer_gossip_state_marks_and_mixes_slow_weight_messages_into_the_slow_weights_too():
    """A message packed while the sender's model equals its slow weights (right after an outer step) is marked, and the
    receiver's model and slow weights both move by the sender's share: both weighted sums are conserved. A message of
    a model away from its slow weights (plain gossip between outer steps) moves the receiver's model only."""
    from lightning_gossip.gossip.outer import OuterGossipState, carries_slow_weights

    params = [torch.tensor([1.0, 2.0]), torch.tensor([3.0])]
    buffers = [torch.tensor([10.0])]
    state = OuterGossipState(params + buffers, 0.25)
    slow = [torch.tensor([0.0, 0.0]), torch.tensor([1.0])]
    state.slow = slow
    sender_params = [torch.tensor([5.0, 6.0]), torch.tensor([7.0])]
    sender = OuterGossipState(sender_params + [torch.tensor([20.0])], 0.5)
    sender.slow = [t.clone() for t in sender_params]  # right after its outer step: theta = phi
    before = (0.25 * torch.tensor([1.0, 2.0, 3.0]) + 0.5 * torch.tensor([5.0, 6.0, 7.0]),
              0.25 * torch.tensor([0.0, 0.0, 1.0]) + 0.5 * torch.tensor([5.0, 6.0, 7.0]))
    message = sender.pack(sender.new_message(), step=7, sender=1)
    assert carries_slow_weights(message)
    state.mix(message, 0.5)
    assert state.weight == 0.75
    theta = torch.cat([params[0], params[1]])
    phi = torch.cat([slow[0], slow[1]])
    torch.testing.assert_close(theta, before[0] / 0.75)
    torch.testing.assert_close(phi, before[1] / 0.75)  # sum a phi conserved: the payload stood for the sender's phi
    torch.testing.assert_close(buffers[0], torch.tensor([50.0 / 3]))
    sender_params[0].add_(1.0)  # the sender trained on: its model is away from its slow weights
    inner = sender.pack(sender.new_message(), step=9, sender=1)
    assert not carries_slow_weights(inner)
    kept = phi.clone()
    state.mix(inner, 0.5)
    assert torch.equal(torch.cat([slow[0], slow[1]]), kept) and state.weight == 1.25
