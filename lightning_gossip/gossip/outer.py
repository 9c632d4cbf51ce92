"""The outer optimizer for gossip: slow weights, outer momentum and a random pairing every H steps.

DiLoCo (Douillard et al. 2023) keeps, besides the model theta that the inner optimizer trains, slow weights phi.
Every H steps it all-reduces the pseudo-gradient (the displacement theta_i - phi over the H steps), applies it to
phi with an outer optimizer (SGD, Nesterov momentum 0.9, lr 0.7) and restarts every worker from the new phi. NoLoCo
(Kolehmainen et al. 2025) does it with no all-reduce: random pairs average their phi and pseudo-gradients before the
outer step. Here, with ``outer_every=H``, every H-th step (after that optimizer step):

  1. every rank takes the outer step from its own slow weights, with its own d_i = theta_i - phi_i:
         b_i <- mu b_i + d_i;  phi_i <- phi_i + lr (d_i + mu b_i)   (Nesterov; heavy-ball: phi_i <- phi_i + lr b_i)
         theta_i <- phi_i;
  2. the ranks pair up at random (a uniform perfect matching drawn from (seed, step), the same on every rank; with
     an odd number of ranks one sits the round out) and each pair averages what it now holds, theta_i = phi_i, by
     the sum-weight rule: each halves a_i and pushes (theta_i, a_i) to its partner. One model per rank and round.

A pairing message is the sender's model right after its outer step, where it equals the sender's slow weights, so
the receiver mixes it into its model *and* its slow weights with the same sum-weight share (:class:`OuterGossipState`),
whenever it is mixed in (at once, K steps later with ``staleness=K``, or when it arrives in the asynchronous mode,
where every rank pushes to a random peer right after each of its own outer steps): the model's exact consensus
sum_i a_i theta_i and the slow weights' sum_i a_i phi_i are both conserved by every such mix; gossip moves neither,
only the inner and outer steps do. sum_i a_i = 1 as in plain gossip. With ``p = 0`` pairs of equal weights keep
equal weights, every a_i stays 1/M, and the means of (phi, b) follow DiLoCo's outer optimizer exactly (with the mean
pseudo-gradient); at M = 2 the method *is* DiLoCo. b is per-rank state (averaged only by ``consensus_()``). Plain
gossip between outer steps (``p > 0``) mixes models only (see :class:`OuterGossipState`).

``docs/outer.md`` has the design, the alternatives measured (NoLoCo's order: mix, then step) and the results.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gossip.gossip.schedule import GossipSchedule, StepPlan, uniform_all_ranks
from lightning_gossip.gossip.state import GossipState, gossiped_tensors

# The registered strategy names (Trainer and Fabric) and conf/strategy/gossip_outer*.yaml: no gossip between outer
# steps, the settings the MNIST-1D tuning chose (experiments/results/mnist1d/README.md, docs/outer.md).
RECOMMENDED_OUTER: dict[str, Any] = {"p": 0.0, "outer_every": 8, "outer_lr": 0.3, "outer_momentum": 0.9,
                                     "outer_nesterov": True}
OUTER_STRATEGIES: dict[str, tuple[str, dict[str, Any]]] = {
    "gossip_outer": (
        "Gossip with DiLoCo's outer step and no all-reduce: every 8 steps a Nesterov outer step from each rank's "
        "slow weights, then a random pairing averages them",
        RECOMMENDED_OUTER,
    ),
    "gossip_outer_async": (
        "The same, asynchronous: every 8 of its own steps a rank takes its outer step and pushes its slow weights "
        "to a random peer, which mixes them in when they arrive",
        {**RECOMMENDED_OUTER, "asynchronous": True},
    ),
}

# The pairing's own stream of draws (the lock-step schedule uses streams 0 and 1 for its coins and peers).
STREAM_PAIRING = 2


def random_pairing(seed: int, step: int, world_size: int) -> np.ndarray:
    """Every rank's partner at ``step`` (-1: none; one rank when ``world_size`` is odd): a uniform perfect matching.

    A pure function of its arguments: the order of ``world_size`` counter-based uniforms is a uniform permutation,
    and pairing its consecutive entries gives a uniform matching, the same on every rank without talking.
    """
    order = np.argsort(uniform_all_ranks(seed, step, world_size, STREAM_PAIRING), kind="stable")
    partner = np.full(world_size, -1, dtype=np.int64)
    pairs = order[: world_size - world_size % 2].reshape(-1, 2)
    partner[pairs[:, 0]] = pairs[:, 1]
    partner[pairs[:, 1]] = pairs[:, 0]
    return partner


class OuterSchedule:
    """The lock-step schedule with the outer exchanges: at every H-th step a random pairing (every paired rank
    pushes to its partner), at the other steps the gossip schedule it wraps (nothing when ``p = 0``)."""

    def __init__(self, inner: GossipSchedule, every: int) -> None:
        self.inner = inner
        self.every = int(every)

    @property
    def seed(self) -> int:
        return self.inner.seed

    @seed.setter
    def seed(self, value: int) -> None:  # a resume sets the checkpoint's seed (GossipAverager.load_state_dict)
        self.inner.seed = int(value)

    @property
    def world_size(self) -> int:
        return self.inner.world_size

    @property
    def p(self) -> float:
        return self.inner.p

    @property
    def topology(self) -> Any:
        return self.inner.topology

    def is_outer_step(self, step: int) -> bool:
        """Whether gossip step ``step`` (0-based) ends an outer round: the (step + 1)-th optimizer step."""
        return (step + 1) % self.every == 0

    def plan(self, step: int) -> StepPlan:
        if self.is_outer_step(step) and self.world_size > 1:
            return StepPlan(step=step, sends=random_pairing(self.seed, step, self.world_size))
        return self.inner.plan(step)


@torch.no_grad()
def outer_update_(
    theta: Sequence[Tensor], slow: Sequence[Tensor], buffer: Sequence[Tensor], lr: float, momentum: float,
    nesterov: bool
) -> None:
    """One outer step, in place: d = theta - phi; b <- mu b + d; phi <- phi + lr (d + mu b) (Nesterov) or
    phi + lr b; theta <- phi.

    This is ``torch.optim.SGD(lr, momentum, nesterov)`` applied to phi with the gradient phi - theta (DiLoCo's
    pseudo-gradient), with every quantity negated: the same floating-point operations, so the same bits.
    """
    theta, slow, buffer = list(theta), list(slow), list(buffer)
    delta = torch._foreach_sub(theta, slow)
    torch._foreach_mul_(buffer, momentum)
    torch._foreach_add_(buffer, delta)
    if nesterov:
        torch._foreach_add_(delta, buffer, alpha=momentum)
        update = delta
    else:
        update = buffer
    torch._foreach_add_(slow, update, alpha=lr)
    torch._foreach_copy_(theta, slow)


# Header slot 3 of a message (reserved in GossipState's layout; the asynchronous exchange's "kind", where 0 is gossip
# and 1 its stop message): 2 marks a payload that equals its sender's slow weights.
HEADER_KIND_SLOT = 3
PAYLOAD_IS_SLOW = 2.0


def _sum64(tensors: Sequence[Tensor]) -> float:
    """sum of every element, in float64: the linear functional L the slow-weight ledger tracks."""
    return float(torch.stack([t.sum(dtype=torch.float64) for t in tensors]).sum()) if len(tensors) else 0.0


class SlowWeightLedger:
    """What the invariant checker (``verify``) needs to check the slow weights' exact consensus at every cut.

    Let C = sum_i a_i L(phi_i) + sum over marked messages received and not mixed in of w L(x) (L: the sum of all
    elements; its quotient by the same weights is the exact consensus of phi). Marked messages move weight and slow
    weights together, so gossip conserves C; only local events change it, and each rank records them here in
    ``moved``: its outer steps (a_i (L(phi') - L(phi))), unmarked sends and receives (weight moved without slow
    weights: -w L(phi_sender), +w L(phi_receiver)), rejected messages (+w L(phi)) and the transfer dtype's rounding
    of a marked payload. At a cut the checker tests sum_i C_i - sum_i base_i == sum_i moved_i, which a lost message,
    a mix into the model but not the slow weights or a wrong share breaks; then base_i <- C_i, moved_i <- 0.
    """

    def __init__(self) -> None:
        self.base: Optional[float] = None  # None: re-based at the next cut (after a restart or a resume)
        self.moved = 0.0


class OuterGossipState(GossipState):
    """A :class:`GossipState` whose messages can stand for the sender's slow weights as well as its model.

    A rank right after its outer step holds theta = phi (bit for bit), so the model it sends then is also its slow
    weights: :meth:`pack` marks such a message, and :meth:`mix` mixes a marked message into the model *and* the slow
    weights (the parameters' part of the payload) with the same share, x <- lerp(x, x_s, w), phi <- lerp(phi, x_s, w).
    The a-weighted sums of the models and of the slow weights are then each conserved by every mix, whenever it
    happens. An unmarked message (plain gossip between outer steps, ``p > 0``) is mixed into the model only: the
    models' sum is conserved, the slow weights stay per-rank state whose weighted mean moves with the weights.
    """

    slow: Sequence[Tensor] = ()  # set by OuterOptimizer.for_module: the parameters' slow weights, in state order
    ledger: Optional[SlowWeightLedger] = None  # set with ``verify`` (OuterOptimizer.for_module)

    def pack(self, message: Tensor, step: int, sender: int) -> Tensor:
        super().pack(message, step, sender)
        marked = bool(self.slow) and all(torch.equal(t, s) for t, s in zip(self.tensors, self.slow))
        if marked:
            self.header(message)[HEADER_KIND_SLOT] = PAYLOAD_IS_SLOW
        if self.ledger is not None:  # the message holds the weight self.weight (halved already)
            own = self.weight * _sum64(self.slow)
            # marked: only the transfer dtype's rounding of phi moves C; unmarked: the weight leaves without phi
            self.ledger.moved += (self.weight * self.payload_slow_sum(message) - own) if marked else -own
        return message

    def mix(self, message: Tensor, sender_weight: float) -> None:
        share = sender_weight / (self.weight + sender_weight)
        super().mix(message, sender_weight)
        if self.slow and carries_slow_weights(message):
            payload = self.payload(message)
            if payload.dtype != self.work_dtype:
                payload = payload.to(self.work_dtype)
            with torch.no_grad():
                torch._foreach_lerp_(list(self.slow), self._views(payload)[: len(self.slow)], share)
        elif self.ledger is not None:  # weight arrived without slow weights
            self.ledger.moved += sender_weight * _sum64(self.slow)

    def absorb_weight(self, sender_weight: float) -> None:
        super().absorb_weight(sender_weight)
        if self.ledger is not None:  # a rejected (non-finite) message: its weight joins, its values do not
            self.ledger.moved += sender_weight * _sum64(self.slow)

    def payload_slow_sum(self, message: Tensor) -> float:
        """L of the slow-weight part of a message's payload (as it would be mixed in: in the working dtype)."""
        views = self._views(self.payload(message))[: len(self.slow)]
        return _sum64([v.to(self.work_dtype) for v in views])

    def slow_contribution(self, in_flight: Sequence[Tensor]) -> tuple[float, float]:
        """(C_i, a scale for its float rounding): a_i L(phi_i) plus w L(x) of every marked message held unmixed."""
        total = self.weight * _sum64(self.slow)
        scale = self.weight * _sum64([s.abs() for s in self.slow])
        for message in in_flight:
            if carries_slow_weights(message):
                weight = GossipState.read_header(message)[0]
                total += weight * self.payload_slow_sum(message)
        return total, scale


def carries_slow_weights(message: Tensor) -> bool:
    """Whether ``message`` was packed when its sender's model equalled its slow weights (right after an outer step)."""
    return float(message[: 8 * (HEADER_KIND_SLOT + 1)].view(torch.float64)[HEADER_KIND_SLOT]) == PAYLOAD_IS_SLOW


class OuterOptimizer:
    """A rank's slow weights phi and outer momentum b over the model's floating-point parameters, and the outer step.

    Buffers (BatchNorm statistics) are gossiped with the model when ``mix_buffers`` but take no outer step: they are
    statistics, not weights an optimizer moves.
    """

    def __init__(self, params: Sequence[Tensor], every: int, lr: float, momentum: float, nesterov: bool) -> None:
        self.params = list(params)
        self.every = int(every)
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.nesterov = bool(nesterov)
        with torch.no_grad():
            self.slow = [p.detach().clone() for p in self.params]
            self.buffer = [torch.zeros_like(p) for p in self.params]
        self.ledger: Optional[SlowWeightLedger] = None  # with ``verify``: the checker's record (SlowWeightLedger)
        self.state: Optional[GossipState] = None  # whose weight a_i scales the ledger's record of an outer step

    @classmethod
    def for_module(
        cls, module: nn.Module, options: Any, state: Optional[GossipState] = None
    ) -> Optional[OuterOptimizer]:
        """The outer optimizer ``options`` ask for (``None`` when ``outer_every`` is not set); an
        :class:`OuterGossipState` ``state`` then mixes what it receives into these slow weights too."""
        if options.outer_every is None:
            return None
        params = gossiped_tensors(module, include_buffers=False)
        outer = cls(params, options.outer_every, options.outer_lr, options.outer_momentum, options.outer_nesterov)
        if isinstance(state, OuterGossipState):
            state.slow = outer.slow
            if getattr(options, "verify", False):
                outer.ledger = state.ledger = SlowWeightLedger()
                outer.state = state
                outer.ledger.base = state.weight * _sum64(outer.slow)  # nothing is in flight at the start
        return outer

    def due(self, steps_taken: int) -> bool:
        """Whether the outer step follows the gossip step that brought the count to ``steps_taken``."""
        return steps_taken % self.every == 0

    def step(self) -> None:
        before = _sum64(self.slow) if self.ledger is not None else 0.0
        outer_update_(self.params, self.slow, self.buffer, self.lr, self.momentum, self.nesterov)
        if self.ledger is not None and self.state is not None:
            self.ledger.moved += self.state.weight * (_sum64(self.slow) - before)

    @torch.no_grad()
    def restart(self) -> None:
        """Slow weights = the current model, momentum zero (a fresh start, e.g. onto another number of workers)."""
        torch._foreach_copy_(self.slow, self.params)
        torch._foreach_zero_(self.buffer)
        self.rebase()

    def rebase(self) -> None:
        """The slow weights were set from outside gossip (restart, resume): the checker's next cut starts afresh."""
        if self.ledger is not None:
            self.ledger.base, self.ledger.moved = None, 0.0

    @torch.no_grad()
    def consensus_(self, weight: float, group: Optional[dist.ProcessGroup], on_nonfinite: str = "warn") -> None:
        """Put the a-weighted means of phi and b on every rank (a collective: every rank calls it with its a_i)."""
        state = GossipState(self.slow + self.buffer, weight)
        mean, _ = state.weighted_mean(group=group, on_nonfinite=on_nonfinite)
        state.load_flat(mean)

    # -- resume ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"slow": _flat_cpu(self.slow), "momentum": _flat_cpu(self.buffer)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rebase()
        numel = sum(p.numel() for p in self.params)
        for key, tensors in (("slow", self.slow), ("momentum", self.buffer)):
            flat = state[key]
            if flat.numel() != numel:
                raise ValueError(
                    f"The outer optimizer's {key!r} in this checkpoint has {flat.numel()} elements, but the model's "
                    f"parameters have {numel}: resume with the model the checkpoint was written with."
                )
            chunks = flat.to(tensors[0].device).split([t.numel() for t in tensors])
            torch._foreach_copy_(tensors, [c.view_as(t) for c, t in zip(chunks, tensors)])  # copy_ casts


def load_outer_state(outer: Optional[OuterOptimizer], saved: Optional[dict[str, Any]], rank: int) -> None:
    """Resume the outer optimizer from a gossip state (``saved``: its ``"outer"`` entry, or ``None``)."""
    if outer is not None and saved is not None:
        outer.load_state_dict(saved)
    elif outer is not None:
        outer.restart()
        if rank == 0:
            warnings.warn(
                "This gossip state was saved without an outer optimizer (outer_every unset): the outer optimizer "
                "starts here, with slow weights = the resumed model and zero momentum.",
                stacklevel=3,
            )
    elif saved is not None and rank == 0:
        warnings.warn(
            "This gossip state holds an outer optimizer's slow weights and momentum, but this run has no outer "
            "optimizer (outer_every unset): they are not used.",
            stacklevel=3,
        )


def _flat_cpu(tensors: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).cpu()
