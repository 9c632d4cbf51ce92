"""The "before" variant of the flat-buffer speed work, kept in the benchmark only.

The library sends one contiguous message per exchange (a 32-byte float64 header and the flat payload, see
:mod:`lightning_gossip.gossip.state`). The naive implementation it replaced sends one point-to-point message per
tensor plus one for the weight. :class:`PerTensorExchange` is that naive version, so the results can show a
before/after row; :class:`PerTensorGossipStrategy` plugs it into the Lightning strategy. Blocking mode only.

(Bounded staleness, prototyped here first, is in the library now: ``GossipAverager(staleness=K)``.)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from lightning_gossip import GossipStrategy
from lightning_gossip.gossip import GossipExchange, GossipScheduleError, PendingExchange
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

    exchange_factory = PerTensorExchange
