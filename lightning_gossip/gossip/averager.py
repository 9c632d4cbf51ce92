"""GoSGD for a hand-written training loop: plain torch.distributed, no Lightning.

    dist.init_process_group("gloo")
    model = make_model()
    gossip = GossipAverager(model, p=0.1, topology="random", seed=0)   # broadcasts rank 0's weights
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in my_shard_of_the_data:
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        gossip.step()                 # with probability p, push (weights, weight/2) to a peer; mix what arrives
    gossip.consensus_()               # every rank now holds the exact weighted average
"""

from __future__ import annotations

import numbers
from collections import deque
from collections.abc import Hashable
from contextlib import contextmanager
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from lightning_gossip.gossip.errors import collective_guard
from lightning_gossip.gossip.exchange import GossipCounters, GossipExchange, PendingExchange
from lightning_gossip.gossip.schedule import GossipSchedule, check_probability
from lightning_gossip.gossip.state import GossipState, gossiped_tensors
from lightning_gossip.gossip.topology import TopologyLike, resolve_topology, validate_topology

TRANSFER_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    if isinstance(overlap, str) or overlap not in (True, False):  # bool, numpy bool, 0/1
        raise TypeError(f"overlap must be True or False, got {overlap!r}.")
    overlap = bool(overlap)
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


def check_gossip_options(
    p: Any,
    topology: TopologyLike,
    average_every: Optional[int],
    transfer_dtype: Any,
    on_nonfinite: str,
    overlap: Any = False,
    staleness: Any = None,
) -> None:
    """Validate the options that do not need a model or a process group, so bad input fails before any spawn."""
    check_probability(p)
    resolve_staleness(overlap, staleness)
    resolve_topology(topology)
    resolve_transfer_dtype(transfer_dtype)
    if average_every is not None and (
        isinstance(average_every, bool) or not isinstance(average_every, numbers.Integral) or average_every < 1
    ):
        raise ValueError(f"average_every must be None or an integer >= 1 (steps), got {average_every!r}.")
    if on_nonfinite not in ("warn", "error"):
        raise ValueError(f"on_nonfinite must be 'warn' or 'error', got {on_nonfinite!r}.")


def check_same_model_on_all_ranks(module: nn.Module, include_buffers: bool) -> None:
    """Fail at setup, naming the first difference, if the ranks' models do not have the same tensors.

    Gossip mixes flat buffers position by position, so a shape mismatch would silently mix unrelated weights.
    """
    named = list(module.named_parameters()) + (list(module.named_buffers()) if include_buffers else [])
    signature = [(name, tuple(t.shape), str(t.dtype)) for name, t in named if t.is_floating_point()]
    everyone: list[Any] = [None] * dist.get_world_size()
    with collective_guard("the check that every rank has the same model"):
        dist.all_gather_object(everyone, signature)
    reference = everyone[0]
    for rank, other in enumerate(everyone):
        if other == reference:
            continue
        for index in range(max(len(reference), len(other))):
            mine = reference[index] if index < len(reference) else None
            theirs = other[index] if index < len(other) else None
            if mine != theirs:
                raise ValueError(
                    f"Gossip needs the same model on every rank, but tensor #{index} is {mine} on rank 0 and "
                    f"{theirs} on rank {rank} (name, shape, dtype)."
                )


class GossipAverager:
    """Sum-weight (push-sum) gossip over the ranks of the default process group.

    Args:
        module: the local model; its floating-point parameters (and buffers, if ``mix_buffers``) are gossiped.
        p: probability that this rank pushes its weights after a step, in [0, 1].
        topology: ``"random"`` (GoSGD), ``"ring"``, ``"exponential"`` or an object with ``peer(rank, M, step, u)``.
        seed: seeds the shared schedule; must be the same on every rank.
        mix_buffers: also gossip floating-point buffers such as BatchNorm running statistics.
        overlap: post step t's transfers and mix them in after step t+1's optimizer step (one step stale), so
            communication hides behind computation. The same as ``staleness=1``.
        staleness: bounded staleness K >= 0: the exchange posted after step t is mixed in after step t+K, so a
            slow transfer hides behind K steps of computation (0 is blocking, 1 is ``overlap``). Mixing points are
            fixed by step number, so runs stay deterministic and resumable; mixed-in models are K steps old. Up to
            K exchanges are in flight per rank, each holding a message-sized buffer for its send and one per
            incoming message (reused from a pool), so memory grows with K.
        average_every: if set, an exact global average every this many steps (Gossip-PGA; with p=0, Local SGD).
        transfer_dtype: dtype on the wire (``"bfloat16"``/``"float16"`` halve the bytes); the weight stays float64.
        on_nonfinite: what to do with a received message holding NaN/Inf: ``"warn"`` (drop its tensors, keep its
            weight, count it) or ``"error"``.
        broadcast: copy rank 0's weights to every rank now (skip when every rank already holds its own state).
    """

    def __init__(
        self,
        module: nn.Module,
        p: float = 0.1,
        topology: TopologyLike = "random",
        seed: int = 0,
        mix_buffers: bool = True,
        overlap: bool = False,
        average_every: Optional[int] = None,
        transfer_dtype: Any = None,
        on_nonfinite: str = "warn",
        broadcast: bool = True,
        staleness: Optional[int] = None,
    ) -> None:
        check_gossip_options(p, topology, average_every, transfer_dtype, on_nonfinite, overlap, staleness)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("GossipAverager needs an initialised default process group (dist.init_process_group).")
        self.module = module
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.topology = resolve_topology(topology)
        validate_topology(self.topology, self.world_size)
        self.schedule = GossipSchedule(self.world_size, p, self.topology, seed)
        self.staleness = resolve_staleness(overlap, staleness)
        self.mix_buffers = mix_buffers
        self.average_every = average_every
        self.state = GossipState(
            gossiped_tensors(module, mix_buffers), 1.0 / self.world_size, resolve_transfer_dtype(transfer_dtype)
        )
        self.exchange = GossipExchange(self.state, self.rank, on_nonfinite=on_nonfinite)
        self.step_count = 0
        # Posted exchanges not mixed in yet, oldest first (at most ``staleness`` of them between steps).
        self._pending: deque[PendingExchange] = deque()
        check_same_model_on_all_ranks(module, mix_buffers)
        if broadcast:
            self.broadcast_from_rank_zero()

    # -- public read-outs -----------------------------------------------------------------------------------------
    @property
    def weight(self) -> float:
        """This rank's gossip weight a_i (float64); the weights of all ranks plus those in flight sum to 1."""
        return self.state.weight

    @property
    def counters(self) -> GossipCounters:
        return self.exchange.counters

    @property
    def overlap(self) -> bool:
        """Whether exchanges are mixed in later than they are posted (``staleness >= 1``)."""
        return self.staleness > 0

    @property
    def in_flight(self) -> bool:
        """Whether an exchange has been posted and not mixed in yet (overlap / bounded staleness)."""
        return bool(self._pending)

    def in_flight_weight(self) -> float:
        """Weight sent to this rank that it has not mixed in yet (waits for the transfers; nonzero only if stale)."""
        return sum(self.exchange.in_flight_weight(pending) for pending in self._pending)

    # -- the algorithm --------------------------------------------------------------------------------------------
    def step(self) -> None:
        """The GoSGD step after an optimizer step: maybe push to a peer, mix in what was sent to this rank."""
        if self.world_size == 1:
            self.step_count += 1
            return
        # Staleness K: step t-K's transfers ran during the last K forward and backward passes; mix them in now,
        # before packing step t's message, so what this rank sends already holds what it received.
        while self._pending and self.step_count - self._pending[0].step >= self.staleness:
            self.exchange.complete(self._pending.popleft())
        pending = self.exchange.post(self.schedule.plan(self.step_count))
        if self.staleness == 0:
            self.exchange.complete(pending)
        else:
            self._pending.append(pending)
        self.step_count += 1
        if self.average_every and self.step_count % self.average_every == 0:
            self.consensus_()

    def finish(self) -> None:
        """Complete every exchange still in flight, so every rank's weight is back in its own a_i."""
        while self._pending:
            self.exchange.complete(self._pending.popleft())

    def broadcast_from_rank_zero(self) -> None:
        """GoSGD's start: every x_i equals rank 0's, a_i = 1/M."""
        flat = self.state.flatten()
        with collective_guard("the broadcast of rank 0's initial weights"):
            dist.broadcast(flat, src=0)
        self.state.load_flat(flat)
        self.state.weight = 1.0 / self.world_size

    def _mean(self) -> tuple[torch.Tensor, float]:
        in_flight = []
        for pending in self._pending:
            self.exchange.wait(pending)
            in_flight += [message for _, message in pending.received]
        return self.state.weighted_mean(in_flight=in_flight, on_nonfinite=self.exchange.on_nonfinite)

    @torch.no_grad()
    def consensus_(self) -> float:
        """Put the exact weighted average on every rank and reset a_i = 1/M; returns the pre-average distance.

        A collective: every rank must call it.
        """
        self.finish()
        mean, total = self.state.weighted_mean(on_nonfinite=self.exchange.on_nonfinite)
        distance = self.state.consensus_distance(mean)
        self.state.load_flat(mean)
        self.state.weight = total / self.world_size
        return distance

    @torch.no_grad()
    def consensus_distance(self) -> float:
        """(1/M) sum_i ||x_i - x_bar||^2, the spread of the workers' models (a collective)."""
        return self.state.consensus_distance(self._mean()[0])

    @contextmanager
    def consensus_swapped_in(self) -> Iterator[float]:
        """Temporarily hold the exact consensus (to evaluate or save it), then restore this rank's own weights.

        Messages in flight are counted in the consensus but not mixed in, so looking at the consensus never
        changes the course of training. Yields the consensus distance. A collective: every rank must enter it.
        """
        local = self.state.flatten()
        with torch.no_grad():
            mean, _ = self._mean()
            distance = self.state.consensus_distance(mean)
            self.state.load_flat(mean)
        try:
            yield distance
        finally:
            self.state.load_flat(local)

    def refresh_tensors(self) -> None:
        """Re-collect the module's tensors (after ``module.to()``, which replaces buffer tensors)."""
        tensors = gossiped_tensors(self.module, self.mix_buffers)
        if [t.numel() for t in tensors] != self.state.numels:
            raise RuntimeError("The model's floating-point tensors changed shape since gossip was set up.")
        self.state.tensors = tensors
        self.state.device = tensors[0].device

    # -- resume ---------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's gossip state, including messages received but not mixed in yet (overlap / staleness).

        ``in_flight`` lists ``(step, sender, message)``: each waited for, so the checkpoint holds it whole, and
        mixed in after step ``step + staleness`` of the resumed run, as it would have been without the stop.
        """
        in_flight = []
        for pending in self._pending:
            self.exchange.wait(pending)
            in_flight += [(pending.step, src, message.cpu().clone()) for src, message in pending.received]
        return {
            "weight": self.state.weight,
            "step": self.step_count,
            "seed": self.schedule.seed,
            "world_size": self.world_size,
            "staleness": self.staleness,
            "counters": self.counters.as_dict(),
            "in_flight": in_flight,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["world_size"] != self.world_size:
            raise ValueError(
                f"This gossip state was saved with {state['world_size']} workers; it cannot be loaded into a run "
                f"with {self.world_size}."
            )
        self.state.weight = float(state["weight"])
        self.step_count = int(state["step"])
        self.exchange.counters = GossipCounters(**state.get("counters", {}))
        # Every saved message arrived whole before the save, so nothing is owed to or by a peer: a resumed run may
        # even use another staleness (the messages are then mixed in after step ``step + its staleness``).
        self._pending = deque()
        for step, src, message in sorted(state["in_flight"], key=lambda entry: (int(entry[0]), int(entry[1]))):
            if message.dtype != torch.uint8 or message.numel() != self.state.message_bytes:
                raise ValueError(
                    f"A gossip message in flight in this checkpoint (step {step}, from rank {src}) has "
                    f"{message.numel()} {message.dtype} elements, but this run's messages are "
                    f"{self.state.message_bytes} bytes: resume with the model, mix_buffers and transfer_dtype the "
                    "checkpoint was written with."
                )
            if not self._pending or self._pending[-1].step != int(step):
                self._pending.append(PendingExchange(int(step), []))
            # A copy: the buffer goes back to the pool after mixing and must not alias the caller's checkpoint.
            buffer = message.to(self.state.device, copy=True)
            self._pending[-1].received.append((int(src), buffer))
            self._pending[-1].buffers.append(buffer)
