"""Moving gossip messages between the two ranks of each scheduled exchange.

Every rank knows the step's :class:`~lightning_gossip.gossip.schedule.StepPlan`, so it posts exactly the sends and
receives that involve it, as one ``batch_isend_irecv`` call: only the ranks of an exchange wait for each other, and no
collective runs per step. :meth:`GossipExchange.post` starts the transfers and returns at once;
:meth:`GossipExchange.complete` waits for them and mixes what arrived. Calling both back to back is the blocking
(synchronous) mode; calling ``complete`` K steps later is the overlapped (K = 1) or bounded-staleness mode, where the
transfer hides behind the next K forward and backward passes. Several exchanges can be in flight at once: each takes
its message buffers from a pool and gives them back when it is mixed in. Between two ranks, messages are matched in
the order they are posted (gloo per peer and tag, NCCL per communicator), and every rank posts in step order, so each
receive gets the message of its own step. All steps share one tag on purpose: a rank that took a different number of
steps then receives a message of the wrong step, which the header check turns into a :class:`GossipScheduleError`
that says so, instead of a hang until the timeout.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field

import torch.distributed as dist
from torch import Tensor

from lightning_gossip.gossip.errors import peer_lost_error
from lightning_gossip.gossip.schedule import StepPlan
from lightning_gossip.gossip.state import GossipState


class GossipScheduleError(RuntimeError):
    """Ranks disagree about the gossip step: they took different numbers of optimizer steps."""


class NonFiniteGossipError(FloatingPointError):
    """A received gossip message held NaN or Inf and ``on_nonfinite='error'`` was asked for."""


@dataclass
class GossipCounters:
    """What one rank has moved. Bytes count whole messages (header and payload), as they cross the wire."""

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_rejected: int = 0
    steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass
class PendingExchange:
    """The transfers of one step that have been posted but not yet mixed in."""

    step: int
    requests: list
    received: list[tuple[int, Tensor]] = field(default_factory=list)
    # The peer rank of each posted operation, in the order of ``requests`` (to name a lost peer).
    peers: list[int] = field(default_factory=list)
    # The message buffers this exchange holds (send and receives); back to the pool once it is mixed in.
    buffers: list[Tensor] = field(default_factory=list)


class GossipExchange:
    """Matched point-to-point transfers of one rank's :class:`GossipState` according to a step plan."""

    def __init__(
        self,
        state: GossipState,
        rank: int,
        on_nonfinite: str = "warn",
        check_finite: bool = True,
    ) -> None:
        if on_nonfinite not in ("warn", "error"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'error', got {on_nonfinite!r}.")
        self.state = state
        self.rank = rank
        self.on_nonfinite = on_nonfinite
        self.check_finite = check_finite
        self.counters = GossipCounters()
        # Free message buffers. A buffer in a posted exchange must not be touched until the transfer is done.
        self._free_buffers: list[Tensor] = []

    def release_free_buffers(self) -> None:
        """Drop the pooled buffers no exchange is using (after training: up to K x (1 + senders) model copies)."""
        self._free_buffers = []

    def _take_buffer(self) -> Tensor:
        return self._free_buffers.pop() if self._free_buffers else self.state.new_message()

    def post(self, plan: StepPlan) -> PendingExchange:
        """Halve the weight and start the send if this rank sends; start a receive per scheduled sender."""
        ops = []
        peers = []
        buffers = []
        target = plan.target_of(self.rank)
        if target is not None:
            # Halve first: the message carries a_i / 2 and this rank keeps a_i / 2, so no mass is created.
            self.state.weight /= 2.0
            send_buffer = self._take_buffer()
            buffers.append(send_buffer)
            self.state.pack(send_buffer, plan.step, self.rank)
            ops.append(dist.P2POp(dist.isend, send_buffer, target))
            peers.append(target)
            self.counters.messages_sent += 1
            self.counters.bytes_sent += self.state.message_bytes
        sources = plan.sources_of(self.rank)
        received = [(src, self._take_buffer()) for src in sources]
        buffers += [buffer for _, buffer in received]
        ops += [dist.P2POp(dist.irecv, buffer, src) for src, buffer in received]
        peers += sources
        try:
            requests = dist.batch_isend_irecv(ops) if ops else []
        except RuntimeError as error:  # a peer that is already gone can fail the post itself
            raise peer_lost_error(self.rank, peers, f"the gossip exchange of step {plan.step}", error) from error
        self.counters.steps += 1
        return PendingExchange(plan.step, requests, received, peers, buffers)

    def wait(self, pending: PendingExchange) -> None:
        """Wait for the step's transfers without mixing; the received messages stay in ``pending``."""
        requests = pending.requests
        # gloo returns one request per operation, so a failure names its peer; NCCL coalesces them into one.
        one_per_op = len(requests) == len(pending.peers)
        for index, request in enumerate(requests):
            try:
                request.wait()
            except RuntimeError as error:  # gloo: connection reset/closed by a dead peer, or the timeout passed
                lost = [pending.peers[index]] if one_per_op else pending.peers
                raise peer_lost_error(self.rank, lost, f"the gossip exchange of step {pending.step}", error) from error
        # Only now: an exchange whose wait failed must not look finished (its buffers may still be written into).
        pending.requests = []

    def in_flight_weight(self, pending: PendingExchange) -> float:
        """The gossip weight carried by the (waited-for) messages of ``pending`` that are not mixed in yet."""
        self.wait(pending)
        return sum(GossipState.read_header(message)[0] for _, message in pending.received)

    def complete(self, pending: PendingExchange) -> None:
        """Wait for the step's transfers and mix the received messages in, in ascending sender order."""
        self.wait(pending)
        for src, message in pending.received:
            weight, step, sender = GossipState.read_header(message)
            if step != pending.step or sender != src:
                raise GossipScheduleError(
                    f"Rank {self.rank} expected the gossip message of step {pending.step} from rank {src} but got "
                    f"step {step} from rank {sender}. Every rank must take the same number of optimizer steps: "
                    "give each rank a shard of the same length (Lightning's DistributedSampler does, unless "
                    "`use_distributed_sampler=False`) and do not skip optimizer steps on some ranks only."
                )
            self.counters.messages_received += 1
            self.counters.bytes_received += self.state.message_bytes
            if self.check_finite and not self.state.payload_is_finite(message):
                self._reject(src, pending.step, weight)
                continue
            self.state.mix(message, weight)
        pending.received = []
        self._free_buffers += pending.buffers
        pending.buffers = []

    def _reject(self, src: int, step: int, weight: float) -> None:
        self.counters.messages_rejected += 1
        text = (
            f"Rank {self.rank} received a gossip message with NaN/Inf values from rank {src} at step {step}; "
            "it was not mixed in (its gossip weight was kept so the total stays 1)."
        )
        if self.on_nonfinite == "error":
            raise NonFiniteGossipError(text)
        warnings.warn(text, RuntimeWarning, stacklevel=3)
        self.state.absorb_weight(weight)
