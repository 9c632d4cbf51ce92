"""What a worker gossips: its floating-point tensors viewed as one flat message, and its gossip weight.

The sum-weight rule x_j <- (a_j x_j + a_s x_s) / (a_j + a_s) is written as x_j <- lerp(x_j, x_s, a_s / (a_j + a_s)),
one fused ``torch._foreach_lerp_`` over all tensors. The gossip weight stays a Python float (IEEE float64) and travels
as float64 in the message header whatever dtype the payload uses.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_gossip.gossip.errors import collective_guard

# Message header, float64 slots: gossip weight, gossip step, sender rank, reserved. 32 bytes keeps the payload aligned
# for every dtype it can have.
HEADER_SLOTS = 4
HEADER_BYTES = HEADER_SLOTS * 8
_WEIGHT, _STEP, _SENDER = 0, 1, 2


NO_FLOAT_TENSORS = (
    "Gossip needs at least one floating-point parameter (or buffer, with mix_buffers=True) to exchange, but the "
    "model has none (integer or empty models cannot be averaged)"
)


def gossiped_tensors(module: nn.Module, include_buffers: bool = True) -> list[Tensor]:
    """Every floating-point parameter and, by default, floating-point buffer (BatchNorm running statistics).

    Integer buffers such as ``num_batches_tracked`` are counters, not weights, and are left alone.
    """
    tensors = [p for p in module.parameters() if p.is_floating_point()]
    if include_buffers:
        tensors += [b for b in module.buffers() if b.is_floating_point()]
    return tensors


class GossipState:
    """The flat view of a worker's model that gossip moves and mixes, plus its gossip weight ``a_i``."""

    def __init__(self, tensors: list[Tensor], weight: float, transfer_dtype: Optional[torch.dtype] = None) -> None:
        if not tensors:
            raise ValueError(f"{NO_FLOAT_TENSORS}.")
        self.tensors = tensors
        self.weight = float(weight)
        self.device = tensors[0].device
        dtypes = {t.dtype for t in tensors}
        # One working dtype for the flat buffers; mixed-precision models are averaged in float32.
        self.work_dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        self.transfer_dtype = transfer_dtype or self.work_dtype
        if not self.transfer_dtype.is_floating_point:
            raise ValueError(f"transfer_dtype must be a floating-point dtype, got {self.transfer_dtype}.")
        self.numels = [t.numel() for t in tensors]
        self.numel = sum(self.numels)
        self.payload_bytes = self.numel * torch.empty((), dtype=self.transfer_dtype).element_size()
        self.message_bytes = HEADER_BYTES + self.payload_bytes

    # -- messages -------------------------------------------------------------------------------------------------
    def new_message(self) -> Tensor:
        """An uninitialised message buffer (header + payload) as raw bytes."""
        return torch.empty(self.message_bytes, dtype=torch.uint8, device=self.device)

    def header(self, message: Tensor) -> Tensor:
        return message[:HEADER_BYTES].view(torch.float64)

    def payload(self, message: Tensor) -> Tensor:
        return message[HEADER_BYTES:].view(self.transfer_dtype)

    def pack(self, message: Tensor, step: int, sender: int) -> Tensor:
        """Write the current tensors, the current weight, the step and the sender into ``message``."""
        views = self._views(self.payload(message))
        with torch.no_grad():
            torch._foreach_copy_(views, self.tensors)
        self.header(message).copy_(
            torch.tensor([self.weight, float(step), float(sender), 0.0], dtype=torch.float64), non_blocking=True
        )
        return message

    @staticmethod
    def read_header(message: Tensor) -> tuple[float, int, int]:
        """(sender weight, step, sender rank) of a received message."""
        weight, step, sender, _ = message[:HEADER_BYTES].view(torch.float64).tolist()
        return weight, int(step), int(sender)

    # -- mixing ---------------------------------------------------------------------------------------------------
    def payload_is_finite(self, message: Tensor) -> bool:
        payload = self.payload(message)
        # NaN and Inf propagate through a sum, so a finite sum proves every element finite: one pass, no temporary
        # (about 30x faster than isfinite().all() on 1M floats). Only a non-finite sum (a NaN/Inf, or finite values
        # whose sum overflows) needs the exact element-wise test.
        return bool(torch.isfinite(payload.sum())) or bool(torch.isfinite(payload).all())

    def mix(self, message: Tensor, sender_weight: float) -> None:
        """The sum-weight rule: x <- (a x + a_s x_s) / (a + a_s), a <- a + a_s."""
        total = self.weight + sender_weight
        payload = self.payload(message)
        if payload.dtype != self.work_dtype:
            payload = payload.to(self.work_dtype)
        with torch.no_grad():
            torch._foreach_lerp_(self.tensors, self._views(payload), sender_weight / total)
        self.weight = total

    def absorb_weight(self, sender_weight: float) -> None:
        """Take a rejected message's weight without its tensors, so the total mass stays 1."""
        self.weight += sender_weight

    # -- flat copies, for consensus and checkpoints ---------------------------------------------------------------
    def flatten(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        flat = torch.empty(self.numel, dtype=dtype or self.work_dtype, device=self.device)
        with torch.no_grad():
            torch._foreach_copy_(self._views(flat), self.tensors)
        return flat

    def load_flat(self, flat: Tensor) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.tensors, self._views(flat))

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [chunk.view_as(t) for chunk, t in zip(flat.split(self.numels), self.tensors)]

    # -- collectives over all ranks -------------------------------------------------------------------------------
    def weighted_mean(
        self, group: Optional[dist.ProcessGroup] = None, in_flight: Sequence[Tensor] = (), on_nonfinite: str = "warn"
    ) -> tuple[Tensor, float]:
        """The exact consensus x_bar = sum_i a_i x_i / sum_i a_i, identical on every rank, and sum_i a_i.

        ``in_flight`` are messages this rank has received but not mixed in yet: their mass counts, so the consensus
        is the same whether it is taken before or after they are mixed. Accumulates in float64 so the result depends
        on the reduction order no more than by the final rounding to the model's dtype.

        A rank whose weights (or an in-flight message) hold NaN/Inf is left out of x_bar, so one diverged worker does
        not poison every other one through the average: with ``on_nonfinite="warn"`` a warning names it, with
        ``"error"`` every rank raises :class:`FloatingPointError` naming it. The returned sum_i a_i still counts its
        weight, so a caller that resets a_i = sum / M keeps the total mass at 1.
        """
        flat = self.flatten(torch.float64).mul_(self.weight)
        total = self.weight
        finite = bool(torch.isfinite(flat.sum())) or bool(torch.isfinite(flat).all())
        if not finite:
            flat.zero_()
        finite_weight = self.weight if finite else 0.0
        for message in in_flight:
            sender_weight = self.read_header(message)[0]
            total += sender_weight
            if self.payload_is_finite(message):
                flat.add_(self.payload(message).to(torch.float64), alpha=sender_weight)
                finite_weight += sender_weight
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        # [weight of finite contributions, all weight, one flag per rank whose own weights are not finite]
        stats = torch.zeros(2 + world_size, dtype=torch.float64, device=self.device)
        stats[0], stats[1], stats[2 + rank] = finite_weight, total, 0.0 if finite else 1.0
        with collective_guard("the all-reduce of the gossip consensus", group):
            dist.all_reduce(flat, group=group)
            dist.all_reduce(stats, group=group)
        stats = stats.tolist()
        bad = [r for r in range(world_size) if stats[2 + r] > 0]
        if bad:
            text = (
                f"Gossip consensus: rank(s) {bad} hold NaN/Inf weights and were left out of the average of the other "
                "ranks (their gossip weight still counts, so the total stays 1)."
            )
            if on_nonfinite == "error":
                raise FloatingPointError(text)
            warnings.warn(text, RuntimeWarning, stacklevel=3)
        return flat.div_(stats[0]), stats[1]

    def consensus_distance(self, mean: Tensor, group: Optional[dist.ProcessGroup] = None) -> float:
        """(1/M) sum_i ||x_i - x_bar||^2 over all ranks, given x_bar from :meth:`weighted_mean`."""
        local = (self.flatten(torch.float64) - mean).pow_(2).sum().reshape(1)
        with collective_guard("the all-reduce of the consensus distance", group):
            dist.all_reduce(local, group=group)
        return float(local.item()) / dist.get_world_size(group)
