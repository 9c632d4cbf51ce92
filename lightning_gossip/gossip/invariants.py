"""Gossip's invariants, checked where they must hold (``GossipOptions(verify=True)`` or ``LIGHTNING_GOSSIP_VERIFY=1``).

At every consistent cut (a quiescent point: the end of an epoch's work, evaluation, a checkpoint, a consensus, the
end of a run) nothing is lost or created:

* mass: the gossip weights of all ranks plus the weights of the messages received and not mixed in yet sum to 1
  (float64 rounding; the weight is halved and added, never scaled);
* messages: every message sent has been received (mixed in, rejected, or held as received-not-mixed);
* coverage: with work sharing, every sample of a finished epoch was handed to exactly one rank;
* slow weights (with the outer optimizer, ``outer_every``): the a-weighted sum of the ranks' slow weights plus
  that of the marked messages held unmixed (whose quotient by the weights is phi's exact consensus) moved since
  the last cut by exactly what the ranks' own outer steps and weight-only transfers moved it
  (:class:`~lightning_gossip.gossip.outer.SlowWeightLedger`): gossip itself conserves it;

and around every look at the consensus (evaluation and checkpoints swap it in and back): the exact weighted mean is
the same after the look as before it, so looking never moves training.

A violation raises :class:`~lightning_gossip.gossip.errors.GossipInvariantError` naming the invariant, the values
and the ranks, on every rank (the checks are collectives, or read the store, so every rank reaches the same verdict).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gossip.gossip.errors import GossipInvariantError, collective_guard
from lightning_gossip.gossip.state import GossipState

if TYPE_CHECKING:
    from lightning_gossip.gossip.averager import GossipAverager

# float64 sums of halved weights: exact but for the additions' rounding, far below this.
MASS_TOLERANCE = 1e-9
# Slow-weight sums, relative to sum_i a_i |phi_i|_1: float32 mixing rounds every element by ~6e-8 of its size.
SLOW_TOLERANCE = 1e-5
# The mean is recomputed from bit-identical weights; anything beyond float rounding is a lost or invented message.
MEAN_TOLERANCE = 1e-6

_WEIGHT, _IN_FLIGHT_WEIGHT, _SENT, _RECEIVED, _IN_FLIGHT, _SLOW, _SLOW_BASE, _SLOW_MOVED, _SLOW_SCALE, _REBASE = range(10)
_GOSSIP_GROUP: Any = object()  # at_cut's default: the averager's group (None is a group: the default one)


class InvariantChecker:
    """The checks of one averager. Every method is a collective over the averager's group."""

    def __init__(self, averager: GossipAverager) -> None:
        self.averager = averager
        self.checks = 0  # how many cuts were checked (tests read it to prove the checks ran)

    def at_cut(self, what: str, group: Any = _GOSSIP_GROUP, ranks: Optional[Sequence[int]] = None) -> None:
        """Mass, messages and work-sharing coverage at a consistent cut named ``what``, over ``group`` (default: the
        averager's; after a lost peer, the survivors', whose gossip ranks are ``ranks``)."""
        averager = self.averager
        group = averager.group if group is _GOSSIP_GROUP else group
        in_flight = averager.exchange.in_flight_messages()
        counters = averager.counters
        # Messages to and from lost peers (on_peer_loss="continue") have no counterpart among the ranks checked.
        lost_sent, lost_received = getattr(averager.exchange, "messages_with_lost", lambda: (0, 0))()
        mine = torch.tensor(
            [
                averager.state.weight,
                sum(GossipState.read_header(message)[0] for message in in_flight),
                counters.messages_sent - lost_sent,
                counters.messages_received - lost_received,
                len(in_flight),
                *self._slow_row(in_flight),
            ],
            dtype=torch.float64,
            device=averager.state.device,
        )
        everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        with collective_guard(f"the invariant check at {what}", group):
            dist.all_gather(everyone, mine, group=group)
        rows = [row.tolist() for row in everyone]
        labels = list(ranks) if ranks is not None else list(range(len(rows)))
        self.checks += 1
        total = sum(row[_WEIGHT] + row[_IN_FLIGHT_WEIGHT] for row in rows)
        if abs(total - averager.expected_mass) > MASS_TOLERANCE:
            weights = ", ".join(f"rank {r}: {row[_WEIGHT]:.17g} (+{row[_IN_FLIGHT_WEIGHT]:.3g} received, not mixed)"
                                for r, row in zip(labels, rows))
            raise GossipInvariantError(
                "mass",
                f"at {what} the gossip weights sum to {total:.17g}, not {averager.expected_mass:.17g} ({weights}): "
                "gossip weight was lost or created.",
                ranks=labels,
            )
        sent = sum(int(row[_SENT]) for row in rows)
        received = sum(int(row[_RECEIVED]) + int(row[_IN_FLIGHT]) for row in rows)
        if sent != received:
            per_rank = ", ".join(
                f"rank {r}: sent {int(row[_SENT])}, received {int(row[_RECEIVED]) + int(row[_IN_FLIGHT])}"
                for r, row in zip(labels, rows)
            )
            raise GossipInvariantError(
                "messages",
                f"at {what} {sent} gossip messages were sent but {received} received ({per_rank}): a message is "
                "still on the wire at what should be a consistent cut, or was lost.",
                ranks=labels,
            )
        # After a lost peer (ranks given: the survivors' cut) its slow weights left with it: re-base, do not compare.
        self._check_slow_weights(rows, what, labels, dist.get_rank(group), compare=ranks is None)
        from lightning_gossip.gossip.work_sharing import verify_finished_passes  # plain torch; avoids a cycle

        verify_finished_passes()

    def mean_unchanged(self, before: Tensor, what: str) -> None:
        """The exact mean now equals ``before`` (taken before the look named ``what``)."""
        after, _ = self.averager.exact_mean()
        scale = 1.0 + float(before.abs().max()) if before.numel() else 1.0
        drift = float((after - before).abs().max()) if before.numel() else 0.0
        self.checks += 1
        if drift > MEAN_TOLERANCE * scale:
            raise GossipInvariantError(
                "mean",
                f"{what} moved the exact weighted mean of the ranks' models by up to {drift:.3g} per weight; looking at "
                "the consensus must not change it (messages mixed in while the consensus was swapped in were lost?).",
                ranks=[],
            )

    def _slow_row(self, in_flight: list[Tensor]) -> list[float]:
        """This rank's slow-weight ledger entries (zeros without an outer optimizer or without its ledger)."""
        outer = self.averager.outer
        ledger = outer.ledger if outer is not None else None
        if ledger is None:
            return [0.0, 0.0, 0.0, 0.0, 1.0]
        contribution, scale = self.averager.state.slow_contribution(in_flight)
        rebase = ledger.base is None
        return [contribution, 0.0 if rebase else ledger.base, ledger.moved, scale, float(rebase)]

    def _check_slow_weights(self, rows: list[list[float]], what: str, labels: list[int], mine: int,
                            compare: bool = True) -> None:
        outer = self.averager.outer
        if outer is None or outer.ledger is None:
            return
        if compare and not any(row[_REBASE] for row in rows):
            now = sum(row[_SLOW] for row in rows)
            expected = sum(row[_SLOW_BASE] + row[_SLOW_MOVED] for row in rows)
            scale = 1.0 + sum(row[_SLOW_SCALE] for row in rows)
            if abs(now - expected) > SLOW_TOLERANCE * scale:
                per_rank = ", ".join(f"rank {r}: {row[_SLOW]:.9g} (was {row[_SLOW_BASE]:.9g}, own changes "
                                     f"{row[_SLOW_MOVED]:+.3g})" for r, row in zip(labels, rows))
                raise GossipInvariantError(
                    "slow weights",
                    f"at {what} the weighted sum of the slow weights is {now:.12g}, but the ranks' own outer steps "
                    f"and weight-only transfers since the last cut account for {expected:.12g} ({per_rank}): a "
                    "message was mixed into a model but not into the slow weights, or slow weights were lost.",
                    ranks=labels,
                )
        rank_row = rows[mine]
        outer.ledger.base, outer.ledger.moved = rank_row[_SLOW], 0.0
