"""Variants the benchmark measures that are not (or no longer) in the library.

1. The "before" variant of the flat-buffer speed work, kept in the benchmark only.

The library sends one contiguous message per exchange (a 32-byte float64 header and the flat payload, see
:mod:`lightning_gossip.gossip.state`). The naive implementation it replaced sends one point-to-point message per
tensor plus one for the weight. :class:`PerTensorExchange` is that naive version, so the results can show a
before/after row; :class:`PerTensorGossipStrategy` plugs it into the Lightning strategy. Blocking mode only.

2. A prototype of bounded-staleness exchange (:class:`StaleGossipAverager`, :class:`StaleGossipStrategy`): the
   exchange posted after step t is mixed in after step t+K, so a slow transfer hides behind K steps of compute.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

from lightning_gossip import GossipStrategy
from lightning_gossip.gossip.averager import GossipAverager
from lightning_gossip.gossip.exchange import GossipExchange, GossipScheduleError, PendingExchange
from lightning_gossip.gossip.schedule import StepPlan
from lightning_gossip.gossip.state import HEADER_BYTES


def _all_finite(t: torch.Tensor) -> bool:
    # The same test as the flat path (a sum first, the exact element-wise check only if the sum is not finite), so
    # the before/after rows differ only in the number of messages.
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


class PerTensorExchange(GossipExchange):
    """One message per tensor (each copied to the transfer dtype) plus a float64 header message."""

    def post(self, plan: StepPlan) -> PendingExchange:
        ops = []
        sent = []
        state = self.state
        target = plan.target_of(self.rank)
        if target is not None:
            state.weight /= 2.0
            header = torch.tensor([state.weight, float(plan.step), float(self.rank), 0.0], dtype=torch.float64)
            tensors = [t.detach().to(state.transfer_dtype, copy=True) for t in state.tensors]
            ops.append(dist.P2POp(dist.isend, header, target))
            ops += [dist.P2POp(dist.isend, t, target) for t in tensors]
            sent = [header, *tensors]  # keep the send buffers alive until the transfer is done
            self.counters.messages_sent += 1
            self.counters.bytes_sent += HEADER_BYTES + state.payload_bytes
        received = []
        for src in plan.sources_of(self.rank):
            header = torch.empty(4, dtype=torch.float64)
            buffers = [torch.empty_like(t, dtype=state.transfer_dtype) for t in state.tensors]
            ops.append(dist.P2POp(dist.irecv, header, src))
            ops += [dist.P2POp(dist.irecv, b, src) for b in buffers]
            received.append((src, (header, buffers)))
        requests = dist.batch_isend_irecv(ops) if ops else []
        self.counters.steps += 1
        pending = PendingExchange(plan.step, requests, received)
        pending.sent = sent  # type: ignore[attr-defined]
        return pending

    def complete(self, pending: PendingExchange) -> None:
        self.wait(pending)
        state = self.state
        for src, (header, buffers) in pending.received:
            weight, step, sender, _ = header.tolist()
            if int(step) != pending.step or int(sender) != src:
                raise GossipScheduleError(f"rank {self.rank}: expected step {pending.step} from {src}")
            self.counters.messages_received += 1
            self.counters.bytes_received += HEADER_BYTES + state.payload_bytes
            if self.check_finite and not all(_all_finite(b) for b in buffers):
                self._reject(src, pending.step, weight)
                continue
            payload = [b.to(state.work_dtype) for b in buffers]
            total = state.weight + weight
            with torch.no_grad():
                torch._foreach_lerp_(state.tensors, payload, weight / total)
            state.weight = total
        pending.received = []


class PerTensorGossipStrategy(GossipStrategy):
    """GossipStrategy whose averager sends one message per tensor (the benchmark's "before" row)."""

    def __init__(self, *args, **kwargs) -> None:
        if kwargs.get("overlap"):
            raise ValueError("The per-tensor variant is implemented for blocking exchange only.")
        super().__init__(*args, **kwargs)

    def _setup_averager(self) -> None:
        super()._setup_averager()
        assert self.averager is not None
        old = self.averager.exchange
        self.averager.exchange = PerTensorExchange(old.state, old.rank, on_nonfinite=old.on_nonfinite)


# ---------------------------------------------------------------------------------------------------------------------
# Prototype: bounded-staleness exchange (the benchmark's "stale<K>" rows). Not in the library (yet).
# ---------------------------------------------------------------------------------------------------------------------
class PooledExchange(GossipExchange):
    """Several exchanges in flight at once: each takes its buffers from a pool and gives them back on completion."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._free: list[torch.Tensor] = []

    def post(self, plan: StepPlan) -> PendingExchange:
        sends = plan.target_of(self.rank) is not None
        sources = len(plan.sources_of(self.rank))
        # The base class reuses self._send_buffer / self._recv_buffers, allocating what is missing: hand it free ones.
        self._send_buffer = self._free.pop() if sends and self._free else None
        self._recv_buffers = [self._free.pop() for _ in range(min(sources, len(self._free)))]
        pending = super().post(plan)
        pending.buffers = ([self._send_buffer] if sends else []) + [m for _, m in pending.received]  # type: ignore
        self._send_buffer, self._recv_buffers = None, []
        return pending

    def complete(self, pending: PendingExchange) -> None:
        buffers = getattr(pending, "buffers", [])
        super().complete(pending)
        self._free.extend(buffers)


class StaleGossipAverager(GossipAverager):
    """Bounded staleness K: the exchange posted after step t is mixed in after step t+K (K=1 is the overlap mode).

    Every transfer gets K steps of computation to hide behind, instead of one. The schedule and the mixing points
    are still fixed by step number, so runs stay deterministic and every send keeps exactly one matching receive;
    the price is that mixed-in models are K steps old. Made from a built GossipAverager by :func:`make_stale`.
    """

    staleness: int
    _queue: deque

    def step(self) -> None:
        if self.world_size == 1:
            self.step_count += 1
            return
        while self._queue and self.step_count - self._queue[0].step >= self.staleness:
            self.exchange.complete(self._queue.popleft())
        self._queue.append(self.exchange.post(self.schedule.plan(self.step_count)))
        self.step_count += 1
        if self.average_every and self.step_count % self.average_every == 0:
            self.consensus_()

    def finish(self) -> None:
        while self._queue:
            self.exchange.complete(self._queue.popleft())

    @property
    def in_flight(self) -> bool:
        return bool(self._queue)

    def in_flight_weight(self) -> float:
        return sum(self.exchange.in_flight_weight(p) for p in self._queue)

    def _mean(self):
        in_flight = []
        for pending in self._queue:
            self.exchange.wait(pending)
            in_flight += [message for _, message in pending.received]
        return self.state.weighted_mean(in_flight=in_flight)

    def state_dict(self):
        if self._queue:
            raise NotImplementedError("the bounded-staleness prototype does not checkpoint messages in flight")
        return super().state_dict()


def make_stale(averager: GossipAverager, staleness: int) -> StaleGossipAverager:
    if staleness < 1:
        raise ValueError(f"staleness must be >= 1, got {staleness}")
    averager.finish()
    old = averager.exchange
    averager.__class__ = StaleGossipAverager
    averager.staleness = int(staleness)  # type: ignore[attr-defined]
    averager._queue = deque()  # type: ignore[attr-defined]
    averager.exchange = PooledExchange(old.state, old.rank, on_nonfinite=old.on_nonfinite)
    averager.exchange.counters = old.counters
    return averager  # type: ignore[return-value]


class StaleGossipStrategy(GossipStrategy):
    """GossipStrategy with the bounded-staleness prototype (``staleness`` steps between posting and mixing)."""

    def __init__(self, *args, staleness: int = 4, **kwargs) -> None:
        kwargs["overlap"] = False
        super().__init__(*args, **kwargs)
        self.staleness = staleness

    def _setup_averager(self) -> None:
        super()._setup_averager()
        assert self.averager is not None
        make_stale(self.averager, self.staleness)
