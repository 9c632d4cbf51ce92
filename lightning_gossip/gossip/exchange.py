"""Moving gossip messages between the two ranks of each scheduled exchange (the lock-step mode).

Every rank knows the step's :class:`~lightning_gossip.gossip.schedule.StepPlan`, so it posts exactly the sends and
receives that involve it, as one ``batch_isend_irecv`` call: only the ranks of an exchange wait for each other, and no
collective runs per step. :meth:`GossipExchange.step` posts step t's transfers and mixes in the exchanges that are due:
with staleness K, the one posted K steps earlier (K = 0: at once, the blocking mode; K = 1: overlapped), so a transfer
hides behind the next K forward and backward passes. The exchange owns every message in flight end to end: the posted
exchanges, oldest first, and a pool of message buffers each takes and gives back when it is mixed in.

Between two ranks, messages are matched in the order they are posted (gloo per peer and tag, NCCL per communicator),
and every rank posts in step order, so each receive gets the message of its own step. All steps share one tag on
purpose: a rank that took a different number of steps then receives a message of the wrong step, which the header
check turns into a :class:`~lightning_gossip.gossip.errors.GossipScheduleError` that says so, instead of a hang until
the timeout.

The protocol every exchange implements (the averager calls nothing else): ``step(step)``, ``cut()``, ``drain()``,
``in_flight_messages()``, ``state_dict()`` / ``load_state_dict()``, ``close()``, ``abort()`` and the attributes
``counters`` and ``equal_steps``.

A rank whose peer has left the training loop (its epoch ended early: ranks took different numbers of steps) would wait
for that peer's message until the process-group timeout. So a wait that lasts longer than a second reads the peer's
post on the :class:`~lightning_gossip.gossip.step_board.StepBoard` and raises a
:class:`~lightning_gossip.gossip.errors.GossipScheduleError` naming both ranks when the peer waits in a collective
instead (gloo; NCCL's waits do not block the host, so there the backend's timeout still applies).
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gossip.gossip.counters import GossipCounters
from lightning_gossip.gossip.errors import (
    GossipScheduleError,
    NonFiniteGossipError,
    peer_lost_error,
    record_first_failure,
)
from lightning_gossip.gossip.groups import group_ranks, message_group
from lightning_gossip.gossip.options import GossipOptions
from lightning_gossip.gossip.schedule import GossipSchedule, StepPlan
from lightning_gossip.gossip.state import GossipState
from lightning_gossip.gossip.step_board import CHECK_AFTER_SECONDS, StepBoard



class Exchange(Protocol):
    """What the averager needs from an exchange (lock-step here; the asynchronous one has the same shape)."""

    counters: GossipCounters
    #: Whether every rank must take the same number of steps (a collective check ends a run when it does).
    equal_steps: bool

    def step(self, step: int) -> None:
        """Run the exchange's part of gossip step ``step`` (right after that optimizer step)."""

    def cut(self) -> None:
        """Reach a consistent cut (a collective in some modes: every rank calls it): afterwards every message sent to
        this rank is mixed in or held in :meth:`in_flight_messages`, so the exact mean and a checkpoint are whole."""

    def drain(self) -> None:
        """Bring every message in flight home and mix it in (may be a collective: every rank calls it)."""

    def in_flight_messages(self) -> list[Tensor]:
        """Messages received by this rank but not mixed in yet (their mass counts in the exact consensus)."""

    def state_dict(self) -> dict[str, Any]:
        """``counters`` and ``in_flight`` (messages received, not mixed in yet), for a checkpoint."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Give back what the exchange holds (buffers, threads); idempotent."""

    def abort(self) -> None:
        """After an error, when other ranks may be gone: give back what can be given back without any collective."""


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
    """Matched point-to-point transfers of one rank's :class:`GossipState`, step by step, from a shared schedule.

    Lock-step: every rank must take the same number of steps (``equal_steps``), and the exchange is at a consistent
    cut after every step (messages received and not mixed in yet are held whole), so :meth:`cut` has nothing to do.

    Args:
        state: this rank's gossiped tensors and weight.
        options: the gossip options (staleness, on_nonfinite).
        group: the process group to gossip in (``None``: the default group). Ranks here are ranks of the group.
        schedule: who sends to whom at each step, identical on every rank of the group.
    """

    def __init__(
        self,
        state: GossipState,
        options: GossipOptions,
        group: Optional[dist.ProcessGroup],
        schedule: GossipSchedule,
    ) -> None:
        self.state = state
        self.group = group
        self.rank = dist.get_rank(group)
        self.schedule = schedule
        self.staleness = options.staleness
        self.on_nonfinite = options.on_nonfinite
        self.check_finite = True
        self.counters = GossipCounters()
        #: Set by the averager: where the peers stand, read when a wait lasts (``None``: wait as the backend does).
        self.board: Optional[StepBoard] = None
        # NCCL's wait() returns at once (it orders the GPU stream); only host-blocking backends (gloo) are watched.
        self._watched = dist.get_backend(group) != "nccl"
        self._waiter: Optional[_TransferWaiter] = None
        # Point-to-point calls take global ranks; the schedule speaks in ranks of the group. Messages travel on a
        # group of their own (see groups.py), never on the one the training's collectives use.
        self._global_rank = group_ranks(group)
        self._messages = message_group(group) if len(self._global_rank) > 1 else None
        # Posted exchanges not mixed in yet, oldest first (at most ``staleness`` of them between steps).
        self._pending: deque[PendingExchange] = deque()
        # Free message buffers. A buffer in a posted exchange must not be touched until the transfer is done.
        self._free_buffers: list[Tensor] = []

    # -- the protocol ---------------------------------------------------------------------------------------------
    @property
    def pending(self) -> tuple[PendingExchange, ...]:
        """The posted exchanges not mixed in yet, oldest first."""
        return tuple(self._pending)

    def step(self, step: int) -> None:
        # Staleness K: step t-K's transfers ran during the last K forward and backward passes; mix them in now,
        # before packing step t's message, so what this rank sends already holds what it received.
        while self._pending and step - self._pending[0].step >= self.staleness:
            self.complete(self._pending.popleft())
        pending = self.post(self.schedule.plan(step))
        if self.staleness == 0:
            self.complete(pending)
        else:
            self._pending.append(pending)

    equal_steps = True

    def cut(self) -> None:
        """Nothing to do: after every step, what was sent to this rank is mixed in or held whole in a pending exchange."""

    def drain(self) -> None:
        while self._pending:
            self.complete(self._pending.popleft())

    def abort(self) -> None:
        """Forget the posted exchanges (a failed run: their peers may be gone) and the pooled buffers."""
        self._pending = deque()
        self.close()

    def in_flight_messages(self) -> list[Tensor]:
        messages = []
        for pending in self._pending:
            self.wait(pending)
            messages += [message for _, message in pending.received]
        return messages

    def in_flight_weight(self) -> float:
        """Weight sent to this rank that it has not mixed in yet (waits for the transfers; nonzero only if stale)."""
        return sum(GossipState.read_header(message)[0] for message in self.in_flight_messages())

    def state_dict(self) -> dict[str, Any]:
        """Counters and the messages received but not mixed in yet, as ``(step, sender, message)``.

        Each is waited for, so the checkpoint holds it whole; a resumed run mixes it in after step
        ``step + staleness``, as it would have been without the stop.
        """
        in_flight = []
        for pending in self._pending:
            self.wait(pending)
            in_flight += [(pending.step, src, message.cpu().clone()) for src, message in pending.received]
        return {"counters": self.counters.as_dict(), "in_flight": in_flight}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = GossipCounters(**state.get("counters", {}))
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

    def close(self) -> None:
        """Drop the pooled buffers no exchange uses (after training: up to K x (1 + senders) model copies)."""
        self._free_buffers = []
        if self._waiter is not None:
            self._waiter.stop()
            self._waiter = None

    # -- one step's transfers (the seams a variant overrides) -----------------------------------------------------
    def _take_buffer(self) -> Tensor:
        return self._free_buffers.pop() if self._free_buffers else self.state.new_message()

    def _p2p(self, op: Any, buffer: Tensor, peer: int) -> dist.P2POp:
        return dist.P2POp(op, buffer, self._global_rank[peer], self._messages)

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
            ops.append(self._p2p(dist.isend, send_buffer, target))
            peers.append(target)
            self.counters.messages_sent += 1
            self.counters.bytes_sent += self.state.message_bytes
        sources = plan.sources_of(self.rank)
        received = [(src, self._take_buffer()) for src in sources]
        buffers += [buffer for _, buffer in received]
        ops += [self._p2p(dist.irecv, buffer, src) for src, buffer in received]
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
        if requests and self.board is not None and self._watched:
            if self._waiter is None:
                self._waiter = _TransferWaiter(f"gossip-transfer-waiter-rank{self.rank}")
            failure = self._waiter.wait(requests, lambda: self._check_peers(pending.peers, pending.step))
        else:
            failure = None
            for index, request in enumerate(requests):
                try:
                    request.wait()
                except RuntimeError as error:
                    failure = (index, error)
                    break
        if failure is not None:  # gloo: connection reset/closed by a dead peer, or the timeout passed
            index, error = failure
            lost = [pending.peers[index]] if one_per_op else pending.peers
            raise peer_lost_error(self.rank, lost, f"the gossip exchange of step {pending.step}", error) from error
        # Only now: an exchange whose wait failed must not look finished (its buffers may still be written into).
        pending.requests = []

    def _check_peers(self, peers: list[int], step: int) -> None:
        """Raise :class:`GossipScheduleError` if a peer of this wait has left the training loop (see StepBoard)."""
        assert self.board is not None
        for peer in peers:
            position = self.board.left_training(peer, step)
            if position is not None:
                text = self.board.describe(peer, position, step, "the gossip exchange")
                record_first_failure(text)
                raise GossipScheduleError(text)

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


class _TransferWaiter:
    """Waits for a step's transfers on a thread of its own, so the training thread can look at the step board while
    it waits: gloo cannot wait with a timeout (a timed-out wait closes the connection) and marks a transfer complete
    only inside ``wait()``. One daemon thread per exchange; a wait the training thread gave up on (a peer left)
    leaves it blocked, which never keeps the interpreter from exiting."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def wait(self, requests: list, check: Any) -> Optional[tuple[int, BaseException]]:
        """Wait for ``requests`` in order; call ``check()`` (which may raise) every CHECK_AFTER_SECONDS meanwhile.
        Returns ``(index, error)`` of the first that failed, or None."""
        done = threading.Event()
        result: list[tuple[int, BaseException]] = []
        self._queue.put((requests, done, result))
        while not done.wait(CHECK_AFTER_SECONDS):
            check()
        return result[0] if result else None

    def stop(self) -> None:
        self._queue.put(None)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            requests, done, result = item
            for index, request in enumerate(requests):
                try:
                    request.wait()
                except BaseException as error:  # noqa: BLE001 - handed to the training thread, which raises it
                    result.append((index, error))
                    break
            done.set()
