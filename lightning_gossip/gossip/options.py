"""GossipOptions: every gossip setting, checked once, in one place.

The averager, the Lightning ``Trainer`` strategy and the Fabric strategy all take their gossip settings as one
:class:`GossipOptions`. Its constructor checks every value and turns the shorthand forms into the resolved ones
(a topology name into a topology object, ``overlap`` into a staleness K, a dtype name into a ``torch.dtype``), so no
other code checks or resolves an option again, and bad input fails before any worker process starts, with an error
that names the value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from collections.abc import Hashable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Optional, Union

import torch

from lightning_gossip.gossip.schedule import check_probability
from lightning_gossip.gossip.topology import Topology, TopologyLike, resolve_topology

TRANSFER_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EVAL_MODES = ("consensus", "local")
ON_NONFINITE = ("warn", "error")
ON_PEER_LOSS = ("fail", "continue")
# ``verify=None`` reads this environment variable ("1"/"true"/"yes" on, "0"/"false"/"no"/"" off), so a test suite or a
# debugging session can switch the invariant checks on for every run, launched workers included, without code changes.
VERIFY_ENV = "LIGHTNING_GOSSIP_VERIFY"


@dataclass(frozen=True)
class GossipOptions:
    """The settings of GoSGD gossip (see the documentation's options page, docs/options.md).

    Args:
        p: probability that a rank pushes its weights after a step, in [0, 1].
        topology: ``"random"`` (GoSGD), ``"ring"``, ``"exponential"`` or an object with ``peer(rank, M, step, u)``;
            held resolved, as a topology object.
        seed: seeds the shared schedule (the same on every rank); ``None``: the caller's global seed, or 0.
        mix_buffers: also gossip floating-point buffers such as BatchNorm running statistics.
        overlap: shorthand for ``staleness=1``. After construction it says whether ``staleness >= 1``.
        staleness: bounded staleness K >= 0: the exchange posted after step t is mixed in after step t+K (0 is
            blocking, 1 is ``overlap``); ``None`` follows ``overlap``. Held resolved, as an int.
        average_every: an exact global average every this many steps (Gossip-PGA; with ``p=0``, Local SGD).
        transfer_dtype: dtype on the wire: ``None`` (the model's), ``"float32"``, ``"bfloat16"``, ``"float16"`` or a
            floating ``torch.dtype``; held resolved, as a ``torch.dtype`` or ``None``.
        on_nonfinite: a received message with NaN/Inf is dropped with a warning (``"warn"``) or raises (``"error"``).
        eval_mode: ``"consensus"`` evaluates the exact average of all ranks; ``"local"`` each rank's own model.
        final_consensus: at the end of training, put the exact average on every rank.
        asynchronous: GoSGD as published: no rank waits for another during an epoch; messages are mixed in when
            they arrive (no schedule, no staleness, no periodic global average).
        outer_every: the outer optimizer (``lightning_gossip/gossip/outer.py``, ``docs/outer.md``): every this many
            steps every rank takes an outer step from its slow weights (Nesterov momentum on its pseudo-gradient, as
            DiLoCo does), then the ranks pair up at random and each pair averages its new slow weights. ``None``: off.
        outer_lr: the outer learning rate, > 0 (1 with no momentum: the slow weights jump to the averaged model).
        outer_momentum: the outer momentum, in [0, 1).
        outer_nesterov: Nesterov momentum (DiLoCo's outer SGD) instead of heavy-ball (NoLoCo's code).
        verify: check gossip's invariants at every quiescent point, evaluation and checkpoint (total gossip weight 1,
            the exact mean unchanged by looking at it, messages sent == received, every sample once per epoch with
            work sharing); a violation raises :class:`~lightning_gossip.gossip.errors.GossipInvariantError` naming
            the invariant and the ranks. Costs an extra all-reduce of the model per evaluation or checkpoint.
            ``None`` reads the environment variable ``LIGHTNING_GOSSIP_VERIFY``; held resolved, as a bool.
        on_peer_loss: what a lost peer (its process killed, its connection closed) does to the run. ``"fail"``
            (default): every rank stops with a :class:`~lightning_gossip.gossip.errors.GossipPeerError` naming it,
            and the run is restarted from its last checkpoint. ``"continue"`` (asynchronous mode only): the
            survivors drop it and train on; the weight it took with it is reported, the consensus is the weighted
            mean of the survivors (see :mod:`lightning_gossip.gossip.survival`).
    """

    p: float = 0.1
    topology: Union[TopologyLike, Topology] = "random"
    seed: Optional[int] = None
    mix_buffers: bool = True
    overlap: bool = False
    staleness: Optional[int] = None
    average_every: Optional[int] = None
    transfer_dtype: Any = None
    on_nonfinite: str = "warn"
    eval_mode: str = "consensus"
    final_consensus: bool = True
    asynchronous: bool = False
    outer_every: Optional[int] = None
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    verify: Optional[bool] = None
    on_peer_loss: str = "fail"

    def __post_init__(self) -> None:
        resolved = {
            "p": check_probability(self.p),
            "topology": resolve_topology(self.topology),
            "seed": _check_seed(self.seed),
            "mix_buffers": check_bool("mix_buffers", self.mix_buffers),
            "staleness": resolve_staleness(self.overlap, self.staleness),
            "average_every": check_optional_int("average_every", self.average_every, minimum=1, unit="steps"),
            "transfer_dtype": resolve_transfer_dtype(self.transfer_dtype),
            "on_nonfinite": _check_choice("on_nonfinite", self.on_nonfinite, ON_NONFINITE, "'warn' or 'error'"),
            "eval_mode": _check_choice("eval_mode", self.eval_mode, EVAL_MODES, f"one of {EVAL_MODES}"),
            "final_consensus": check_bool("final_consensus", self.final_consensus),
            "asynchronous": check_bool("asynchronous", self.asynchronous),
            "outer_every": check_optional_int("outer_every", self.outer_every, minimum=1, unit="steps"),
            "outer_lr": check_positive_real("outer_lr", self.outer_lr),
            "outer_momentum": check_momentum("outer_momentum", self.outer_momentum),
            "outer_nesterov": check_bool("outer_nesterov", self.outer_nesterov),
            "verify": resolve_verify(self.verify),
            "on_peer_loss": _check_choice("on_peer_loss", self.on_peer_loss, ON_PEER_LOSS, "'fail' or 'continue'"),
        }
        resolved["overlap"] = resolved["staleness"] > 0
        if resolved["asynchronous"]:
            _check_asynchronous(self, resolved)
        elif resolved["on_peer_loss"] == "continue":
            raise ValueError(
                "on_peer_loss='continue' needs asynchronous=True: lock-step gossip pairs every rank with a peer by "
                "step number from a schedule over all ranks, so a lost rank leaves its partners waiting for messages "
                "at every step and the schedule cannot drop it without every rank agreeing at the same step (a "
                "collective per step). Use asynchronous=True to survive a lost peer, or keep on_peer_loss='fail' (the "
                "run stops naming the lost rank and restarts from its last checkpoint)."
            )
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    def replace(self, **changes: Any) -> GossipOptions:
        """A copy with ``changes`` applied and checked. ``staleness`` alone resets ``overlap`` to follow it."""
        if "staleness" in changes and "overlap" not in changes:
            changes["overlap"] = False
        return dataclasses.replace(self, **changes)

    def schedule_seed(self, fallback: int = 0) -> int:
        """The schedule's seed: :attr:`seed`, or ``fallback`` (e.g. the global seed) when it is ``None``."""
        return self.seed if self.seed is not None else int(fallback)

    @property
    def mode(self) -> str:
        """``"asynchronous"`` or ``"lock-step"``: which exchange (and which Lightning-side mode) a run uses."""
        return "asynchronous" if self.asynchronous else "lock-step"


def _check_asynchronous(given: GossipOptions, resolved: dict[str, Any]) -> None:
    """Refuse what needs every rank at the same step, which the asynchronous mode gives up (checked here, once)."""
    if resolved["staleness"] > 0:
        raise ValueError(
            f"asynchronous=True mixes messages in as they arrive, so overlap/staleness (got "
            f"overlap={given.overlap!r}, staleness={given.staleness!r}) have no meaning there: leave them unset, or "
            "use the lock-step mode."
        )
    if resolved["average_every"] is not None:
        raise ValueError(
            f"asynchronous=True cannot take average_every={given.average_every!r}: a global average every H steps "
            "needs every rank at the same step, and asynchronous ranks count their own steps (they would each call "
            "the average at a different moment and wait for one another until the timeout). Leave average_every=None "
            "(the consensus is still exact at every quiescent point: each epoch's end, evaluation, checkpoints and "
            "the end of fit), or use the lock-step mode for Gossip-PGA / Local SGD."
        )


def resolve_verify(value: Any) -> bool:
    """``verify`` as a bool: ``None`` reads ``LIGHTNING_GOSSIP_VERIFY`` (unset or empty: off)."""
    if value is not None:
        return check_bool("verify", value)
    text = os.environ.get(VERIFY_ENV, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{VERIFY_ENV} must be one of 1/0, true/false, yes/no, on/off (or unset), got {text!r}.")


def resolve_transfer_dtype(value: Any) -> Optional[torch.dtype]:
    if isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, Hashable) and value in TRANSFER_DTYPES:
        return TRANSFER_DTYPES[value]
    raise ValueError(
        f"transfer_dtype must be None (the model's dtype) or one of {[k for k in TRANSFER_DTYPES if k]}, got {value!r}."
    )


def resolve_staleness(overlap: Any, staleness: Any) -> int:
    """The number of steps between posting an exchange and mixing it in: 0 blocking, 1 overlapped, K bounded.

    ``overlap=True`` is shorthand for ``staleness=1``; a ``staleness`` given as well wins (any K >= 1 overlaps),
    except ``staleness=0`` (blocking), which contradicts ``overlap=True``.
    """
    overlap = check_bool("overlap", overlap)
    if staleness is None:
        return 1 if overlap else 0
    if isinstance(staleness, bool) or not isinstance(staleness, numbers.Integral) or staleness < 0:
        raise ValueError(
            f"staleness must be None or an integer >= 0 (steps between posting an exchange and mixing it in; "
            f"0 is blocking, 1 is overlap), got {staleness!r}."
        )
    if overlap and staleness == 0:
        raise ValueError("overlap=True means staleness=1, but staleness=0 (blocking) was also given; pass one.")
    return int(staleness)


def check_bool(name: str, value: Any) -> bool:
    """``value`` as a bool; an error for anything else (strings such as "false" included)."""
    # Strings such as "false" or "no" are truthy in Python: refuse them rather than read them as True.
    if isinstance(value, str) or value not in (True, False):  # bool, numpy bool, 0/1
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__}).")
    return bool(value)


def _check_seed(value: Any) -> Optional[int]:
    if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
        raise TypeError(f"seed must be None or an int, got {value!r}.")
    return None if value is None else int(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...], phrase: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be {phrase}, got {value!r}.")
    return value


def check_timeout(value: Any) -> Any:
    """``None`` or a positive ``datetime.timedelta`` (a process group's timeout), else an error naming the value."""
    if value is not None and (not isinstance(value, timedelta) or value.total_seconds() <= 0):
        raise TypeError(
            f"timeout must be None or a positive datetime.timedelta (e.g. timedelta(seconds=60)), got {value!r}."
        )
    return value


def check_positive_real(name: str, value: Any) -> float:
    """A finite real number > 0 (not a bool), else an error naming the value and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return float(value)


def check_momentum(name: str, value: Any) -> float:
    """A real number in [0, 1) (not a bool), else an error naming the value and the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}.")
    return float(value)


def check_optional_int(name: str, value: Any, minimum: int, unit: str = "") -> Optional[int]:
    """``None`` or an integer >= ``minimum`` (not a bool, not a float), else an error naming value and range."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = f" ({unit})" if unit else ""
        raise ValueError(f"{name} must be None or an integer >= {minimum}{what}, got {value!r}.")
    return int(value)
