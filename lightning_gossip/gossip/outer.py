"""The outer optimizer for gossip: slow weights, outer momentum and a random pairing every H steps.

DiLoCo (Douillard et al. 2023) keeps, besides the model theta that the inner optimizer trains, slow weights phi.
Every H steps it all-reduces the pseudo-gradient (the displacement theta_i - phi over the H steps), applies it to
phi with an outer optimizer (SGD, Nesterov momentum 0.9, lr 0.7) and restarts every worker from the new phi. NoLoCo
(Kolehmainen et al. 2025) does the same with no all-reduce: a random partition pairs the workers and each pair
averages its phi and its pseudo-gradients. Here:

    every H steps (the outer step, ``outer_every=H``):
      1. the ranks pair up at random (a uniform perfect matching drawn from (seed, step), identical on every rank;
         with an odd number of ranks one sits the round out); each pair averages its *models* theta with the
         sum-weight rule (each rank halves a_i and pushes (theta_i, a_i) to its partner: one model per rank, the
         plain gossip message);
      2. every rank takes the outer step from its own slow weights, with d_i = theta_i - phi_i (theta_i now the
         pair's average):  b_i <- mu b_i + d_i;  phi_i <- phi_i + lr (d_i + mu b_i)  (Nesterov; heavy-ball:
         phi_i <- phi_i + lr b_i);  theta_i <- phi_i.

Averaging theta = phi + d is NoLoCo's update with half its bytes: for a pair, mean(theta) - phi_i =
mean(d) + (mean(phi) - phi_i), which is exactly NoLoCo's pseudo-gradient term plus its pull of phi_i towards the
pair's mean phi (its ``m <- alpha m + gamma mean(theta - phi) + gamma (mean(phi) - phi_i)`` is our heavy-ball rule
with lr = gamma, mu = alpha). So the pseudo-gradient and the slow weights are exchanged implicitly, in their sum.

Mass and consensus: the pair exchange is the sum-weight rule, so sum_i a_i = 1 and the model's exact consensus
sum_i a_i theta_i / sum_i a_i are what they are in plain gossip (conserved by every exchange; moved only by the inner
and outer optimizer steps). Between exchanges every rank's a_i stays 1/M when nothing else is gossiped (p = 0):
a pair of equal weights keeps equal weights. Then the weighted means of (theta, phi, b) are all left unchanged by
the exchange and the outer step moves (mean phi, mean b) exactly as DiLoCo's outer optimizer would move its phi and
b with the mean pseudo-gradient mean(theta) - mean(phi). phi and b are per-rank optimizer state; ``consensus_()``
puts their a-weighted means on every rank along with the model's, so after it every rank holds one identical state.

``docs/outer.md`` has the design, the alternatives and what was measured.
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

# The registered strategy name "gossip_outer" (Trainer and Fabric) and conf/strategy/gossip_outer.yaml: no gossip
# between outer steps, the settings the MNIST-1D tuning chose (experiments/results/mnist1d/README.md, docs/outer.md).
RECOMMENDED_OUTER: dict[str, Any] = {"p": 0.0, "outer_every": 8, "outer_lr": 0.3, "outer_momentum": 0.9,
                                     "outer_nesterov": True}
OUTER_DESCRIPTION = (
    "Gossip with an outer optimizer: every 8 steps a random pairing averages models, then a Nesterov outer step "
    "from each rank's slow weights (DiLoCo without an all-reduce)"
)

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

    @classmethod
    def for_module(cls, module: nn.Module, options: Any) -> Optional[OuterOptimizer]:
        """The outer optimizer ``options`` ask for (``None`` when ``outer_every`` is not set)."""
        if options.outer_every is None:
            return None
        params = gossiped_tensors(module, include_buffers=False)
        return cls(params, options.outer_every, options.outer_lr, options.outer_momentum, options.outer_nesterov)

    def due(self, steps_taken: int) -> bool:
        """Whether the outer step follows the gossip step that brought the count to ``steps_taken``."""
        return steps_taken % self.every == 0

    def step(self) -> None:
        outer_update_(self.params, self.slow, self.buffer, self.lr, self.momentum, self.nesterov)

    @torch.no_grad()
    def restart(self) -> None:
        """Slow weights = the current model, momentum zero (a fresh start, e.g. onto another number of workers)."""
        torch._foreach_copy_(self.slow, self.params)
        torch._foreach_zero_(self.buffer)

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
