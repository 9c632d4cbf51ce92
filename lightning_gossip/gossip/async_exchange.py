"""Asynchronous GoSGD: push (x_i, a_i / 2) to a peer whenever the coin says so, mix whatever has arrived, never wait.

The lock-step exchange (:mod:`lightning_gossip.gossip.exchange`) makes every transfer a rendezvous of two ranks at
the same step, so every rank runs at the slowest one's pace. Here a rank never waits for a peer during training:

* Transport: a gloo group of its own ("side group"), created by every rank at the same point. gloo can receive from
  any source (``ProcessGroup.recv_anysource``), and a gloo send completes only once the receiver has posted a
  matching receive, so each rank runs one receiver thread that keeps a receive posted at all times and hands every
  filled buffer to the training thread. Between one sender and one receiver messages arrive in the order they were
  sent. Messages are CPU buffers (pinned when the model is on CUDA, copied to and from the device), so the mode
  works with NCCL models too, which cannot receive from any source.
* Step (on the training thread, after an optimizer step): mix every message that has arrived, in arrival order, by
  the sum-weight rule; then with probability p halve a_i, pack (x_i, a_i, sender, sequence number) into a send
  buffer and post the send to a peer drawn from the topology. A send buffer is reused only once its send completed.
  The coin and the peer are counter-based draws from (seed, rank, local step): a rank needs nobody to decide.
* Mass: a message's weight leaves the sender when it is packed and joins the receiver when it is mixed, so
  sum_i a_i + (weight in flight) = 1 at every instant.
* Quiescence (:meth:`AsyncGossipExchange.drain`, a collective): the ranks all-reduce how many messages each sent to
  each, every rank waits until it has received what was sent to it and mixes it, then a barrier. Afterwards nothing
  is in flight and sum_i a_i = 1 to float64 rounding, so consensus and checkpoint code applies unchanged.
* Failure: a send to a dead peer fails (gloo: connection closed) and a send that a peer has not taken within the
  timeout means the peer hangs; both become a :class:`GossipPeerError` naming the peer. ``drain`` waits at most the
  timeout and names the ranks whose messages are missing.
* Surviving a lost peer (``on_peer_loss="continue"``, see :mod:`lightning_gossip.gossip.survival`): a push to a dead
  peer never left, so its weight goes back to the sender; the peer is declared lost in the store and drawn no more
  (the topology is applied to the survivors, renumbered in rank order); its messages that arrive after a rank
  learned of the loss are dropped. Quiescence exchanges the counts through the store among the survivors instead
  of an all-reduce over the old world, and accounts for exactly the weight lost: every rank's weight at the previous
  cut, plus what the survivors delivered to the lost peers, less what they received from them. The receiver thread is a daemon thread: it never keeps
  the interpreter from exiting. :meth:`close` stops it cleanly when every rank closes (a stop message from the
  previous rank in a ring, after a barrier that proves no gossip message is still on its way).
"""

from __future__ import annotations

import json
import logging
import math
import queue
import threading
import time
import warnings
from collections import deque
from datetime import timedelta
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gossip.gossip.counters import GossipCounters
from lightning_gossip.gossip.errors import GossipPeerError, NonFiniteGossipError, collective_guard, peer_lost_error
from lightning_gossip.gossip.errors import store as gossip_store
from lightning_gossip.gossip.groups import message_group, process_group_timeout
from lightning_gossip.gossip.schedule import _STREAM_PEER, _STREAM_SEND, uniform
from lightning_gossip.gossip.state import GossipState
from lightning_gossip.gossip.survival import PROBE_AFTER_SECONDS, LossAccount, LostPeer, Survivors
from lightning_gossip.gossip.topology import RandomPeer, resolve_topology, validate_topology

log = logging.getLogger("lightning_gossip.survival")

#: How long probes may look for the dead peer behind a failed receive before the run fails (on_peer_loss="continue").
TROUBLE_GRACE_SECONDS = 5.0

# Header slot 3 (reserved in GossipState's layout) says what a message is.
_KIND_SLOT = 3
_KIND_GOSSIP = 0.0
_KIND_STOP = 1.0  # close(): the receiver thread ends after this message
_RANDOM_PEER = RandomPeer()  # the outer optimizer's push goes to a uniformly random peer
# Written into a receive buffer before it is posted (on_peer_loss="continue"): a header that still says so has not
# started to receive a message (see survival.py, fact 3).
_KIND_UNFILLED = -1.0
_TAG = 0
_PROBE_TAG = 1  # probes: failure diagnosis (never received), or, with on_peer_loss="continue", the probe receiver's
# The side group's own gloo timeout must never fire: a gloo wait that times out poisons every connection of the
# group, and the receiver legitimately waits for as long as no peer sends. Timeouts are enforced here instead.
_SIDE_GROUP_TIMEOUT = timedelta(days=365)


class AsyncGossipExchange:
    """The asynchronous exchange of one rank's :class:`GossipState` (the exchange protocol of the averager).

    Args:
        state: this rank's flat tensors and gossip weight.
        options: a ``GossipOptions`` (``p``, ``topology``, ``seed``, ``on_nonfinite`` are read) or None.
        group: the process group of the gossiping ranks (default: the default group). Every rank of the default
            group must construct the exchange at the same point (it creates two gloo groups).
        schedule: a ``GossipSchedule``; when given, its ``p``, ``topology`` and ``seed`` win over ``options``.
        timeout: how long a send may wait for its receiver and :meth:`drain` for missing messages before the peer
            is declared lost (default: the process group's timeout).
        max_sends_in_flight: how many of this rank's pushes may wait for their receiver at once; a coin that comes
            up while that many are waiting is skipped (``counters.sends_skipped``). Default 1, because a message in
            flight carries half of the sender's weight *and* an older model: with several outstanding, most of a
            rank's weight sits in stale copies (the oldest message carries the most) and each one pulls its
            receiver back when it is mixed. On MNIST-1D with 4 workers at p = 0.5 (1500 steps, 1 ms steps on 2
            CPU cores, so pushes waited several steps) the consensus reached 0.55-0.61 test accuracy with 16
            allowed, 0.66 with 4 and 0.69 with 1 (``experiments/results/mnist1d/README.md``). It also bounds the
            memory a hung peer costs until the timeout names it.
        p, topology, seed, on_nonfinite: used when neither ``options`` nor ``schedule`` give them.
    """

    def __init__(
        self,
        state: GossipState,
        options: Any = None,
        group: Optional[dist.ProcessGroup] = None,
        schedule: Any = None,
        *,
        timeout: Optional[timedelta] = None,
        max_sends_in_flight: int = 1,
        check_finite: bool = True,
        p: float = 0.1,
        topology: Any = "random",
        seed: int = 0,
        on_nonfinite: str = "warn",
    ) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("AsyncGossipExchange needs an initialised default process group.")
        source = schedule if schedule is not None else options
        self.p = float(getattr(source, "p", p))
        self.topology = resolve_topology(getattr(source, "topology", topology) or RandomPeer())
        source_seed = getattr(source, "seed", seed)
        self._schedule = schedule  # its seed is read at every coin: a resume may set the checkpoint's seed on it
        # The outer optimizer's schedule (outer.OuterSchedule) says at which steps this rank pushes after its outer step.
        self._outer_step = getattr(schedule, "is_outer_step", None)
        self._seed = int(source_seed if source_seed is not None else 0)  # GossipOptions(seed=None): the averager's 0
        self.on_nonfinite = getattr(options, "on_nonfinite", on_nonfinite)
        self.on_peer_loss = getattr(options, "on_peer_loss", "fail")
        if self.on_nonfinite not in ("warn", "error"):
            raise ValueError(f"on_nonfinite must be 'warn' or 'error', got {self.on_nonfinite!r}.")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"Gossip probability p must be in [0, 1], got {self.p!r}.")
        if max_sends_in_flight < 1:
            raise ValueError(f"max_sends_in_flight must be an integer >= 1, got {max_sends_in_flight!r}.")
        self.state = state
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.timeout = timeout if timeout is not None else process_group_timeout(group)
        self.max_sends_in_flight = int(max_sends_in_flight)
        self.check_finite = check_finite
        self.counters = GossipCounters()
        # On CUDA, messages cross the wire from pinned host memory; pack/mix go through a device staging buffer.
        self._on_device = state.device.type != "cpu"
        self._pin = self._on_device and torch.cuda.is_available()
        self._staging: Optional[Tensor] = None

        # Bookkeeping shared with the receiver thread (guarded by _cond's lock).
        self._cond = threading.Condition()
        self._arrived: deque[tuple[int, Tensor]] = deque()  # (sender, message), in arrival order
        self._received_from = [0] * self.world_size  # cumulative, since construction
        self._free_receive: list[Tensor] = []
        self._receiver_error: Optional[BaseException] = None
        # gloo marks a send complete only inside wait(), so a completion thread waits on each send in turn and gives
        # its buffer back to the pool; the training thread only looks at what it recorded (guarded by _cond too).
        self._send_queue: queue.SimpleQueue = queue.SimpleQueue()
        # send id -> (destination, posted at, the message's weight, its Work)
        self._sends_in_flight: dict[int, tuple[int, float, float, Any]] = {}
        self._send_error: Optional[tuple[int, BaseException]] = None
        self._free_send: list[Tensor] = []
        self._send_id = 0
        # Training-thread only.
        self._sent_to = [0] * self.world_size  # cumulative, since construction
        self._seq = 0
        self._drains = 0
        self._quiescent = False
        self._probes: list = []
        self._uid = ""
        self._closed = False
        self._failed = False
        self._thread: Optional[threading.Thread] = None
        self._completer: Optional[threading.Thread] = None
        self._side: Optional[dist.ProcessGroup] = None
        self._control: Optional[dist.ProcessGroup] = None
        # on_peer_loss="continue": the membership, and the accounting of what moved to and from every peer
        # (cumulative; guarded by _cond), read at every consistent cut.
        self.survivors: Optional[Survivors] = None
        world = self.world_size
        self._delivered = [0] * world  # pushes to each peer that completed (the bytes were written whole)
        self._delivered_weight = [0.0] * world
        self._received_weight = [0.0] * world  # weight of the messages counted in _received_from
        self._returned = [0] * world  # pushes to each peer that failed: their weight came back
        self._returned_weight = [0.0] * world
        self._refused = [0] * world  # of those, pushes refused when posted (never counted as sent)
        self._dropped = [0] * world  # messages from a lost peer that arrived after this rank learned of the loss
        self._lost: set[int] = set()  # peers this rank knows are lost
        self._failed_sends: list[tuple[int, float, BaseException]] = []  # (destination, weight, error), not handled
        self._current_receive: Optional[tuple[Any, Tensor]] = None  # the receive the receiver thread waits for
        self._receiver_trouble: Optional[BaseException] = None
        self._trouble_since: Optional[float] = None  # when the receiver's trouble was first seen (monotonic)
        self._lost_at_trouble = 0  # how many peers were known lost then
        # The last consistent cut: its members, their gossip weights, and the cumulative counts then.
        self._cut_members = list(range(world))
        self._cut_weights = [1.0 / world] * world
        self._at_cut = self._ledger()
        if self.world_size > 1:
            # Messages travel on their own group (see groups.py); the control group carries drain's count all-reduce
            # and barriers, with the real timeout. Both are gloo: it can receive from any source (NCCL cannot).
            self._side = message_group(group, timeout=_SIDE_GROUP_TIMEOUT, backend="gloo")
            self._control = message_group(group, timeout=self.timeout, backend="gloo")
            # Unique per exchange and the same on every rank (groups are created in the same order everywhere).
            self._uid = str(getattr(self._side, "group_name", "")) or str(id(self))
            if self.on_peer_loss == "continue":
                self.survivors = Survivors(group, self._side, f"lightning_gossip/async/{self._uid}/survival",
                                           self.timeout, _PROBE_TAG)
                self.survivors.on_loss(self._peer_lost)
            self._thread = threading.Thread(
                target=self._receive_loop, name=f"gossip-async-receiver-rank{self.rank}", daemon=True
            )
            self._completer = threading.Thread(
                target=self._complete_sends_loop, name=f"gossip-async-sends-rank{self.rank}", daemon=True
            )
            self._thread.start()
            self._completer.start()

    #: Ranks take as many steps as their speed allows.
    equal_steps = False

    def cut(self) -> None:
        """A consistent cut is reached by quiescence: :meth:`drain` (a collective)."""
        self.drain()

    def abort(self) -> None:
        """After an error: stop without any collective (the daemon threads may stay blocked; they never keep the
        interpreter from exiting)."""
        self.close(clean=False)

    @property
    def seed(self) -> int:
        """The seed of the coins and peers: the schedule's, when one was given (a resume may change it there)."""
        return int(self._schedule.seed) if self._schedule is not None else self._seed

    # -- buffers --------------------------------------------------------------------------------------------------
    def _new_host_message(self) -> Tensor:
        return torch.empty(self.state.message_bytes, dtype=torch.uint8, pin_memory=self._pin)

    def _header(self, message: Tensor) -> Tensor:
        return message[:32].view(torch.float64)

    # -- the receiver thread --------------------------------------------------------------------------------------
    def _receive_loop(self) -> None:
        assert self._side is not None
        surviving = self.survivors is not None
        troubles = 0
        while True:
            with self._cond:
                buffer = self._free_receive.pop() if self._free_receive else None
            if buffer is None:
                buffer = self._new_host_message()
            if surviving:
                self._header(buffer).fill_(_KIND_UNFILLED)  # before posting: nothing writes into it yet
            try:
                work = self._side.recv_anysource([buffer], _TAG)
                with self._cond:
                    self._current_receive = (work, buffer)
                completed = work.wait()
                with self._cond:
                    self._current_receive = None
                if completed is False:  # aborted: it was stuck on a lost peer's message (see _peer_lost)
                    continue
                source = work._source_rank()
            except BaseException as error:  # noqa: BLE001 - handed to the training thread, which raises it
                with self._cond:
                    self._current_receive = None
                    if surviving and troubles < 1000:
                        # A peer died while its message was being matched to this receive: the training thread looks
                        # for the dead peer; this thread receives on (gloo keeps the other peers' connections).
                        troubles += 1
                        self._receiver_trouble = error
                        self._cond.notify_all()
                        continue
                    self._receiver_error = error
                    self._cond.notify_all()
                return
            if float(self._header(buffer)[_KIND_SLOT]) == _KIND_STOP:
                return
            weight = GossipState.read_header(buffer)[0]
            with self._cond:
                if source in self._lost:
                    self._dropped[source] += 1  # its weight is lost with it (the accounting never counted it)
                    self._free_receive.append(buffer)
                    continue
                self._arrived.append((source, buffer))
                self._received_from[source] += 1
                self._received_weight[source] += weight
                self._cond.notify_all()

    def _check_receiver(self) -> None:
        trouble = self._receiver_trouble
        if trouble is not None and self.survivors is not None:
            # A receive failed: a peer died while its message was being read. Explained once a peer is known lost (a
            # survivor may have declared it already) or a probe finds one; the evidence can lag the receive's error
            # by a moment, so probes go on for TROUBLE_GRACE_SECONDS before the run fails.
            now = time.monotonic()
            if self._trouble_since is None:
                self._trouble_since = now
                self._lost_at_trouble = len(self.survivors.lost)
            self.survivors.refresh(force=True)
            others = [r for r in self.survivors.alive if r != self.rank]
            found = self.survivors.check(others, "an asynchronous gossip receive")
            if found or len(self.survivors.lost) > self._lost_at_trouble:
                self._receiver_trouble = None
                self._trouble_since = None
            elif now - self._trouble_since > TROUBLE_GRACE_SECONDS:
                self._failed = True
                raise GossipPeerError(
                    f"Rank {self.rank}: the asynchronous gossip receiver failed and no peer was found gone within "
                    f"{TROUBLE_GRACE_SECONDS:.0f} s: {trouble}", self.rank, [],
                ) from trouble
        error = self._receiver_error
        if error is not None:
            self._failed = True
            lost = self._locate_lost_peers()
            if lost:
                raise peer_lost_error(self.rank, lost, "an asynchronous gossip receive", error) from error
            raise GossipPeerError(
                f"Rank {self.rank}: the asynchronous gossip receiver failed: {error}", self.rank, []
            ) from error

    def _locate_lost_peers(self) -> list[int]:
        """The peers whose connection is closed: gloo refuses a send to them at once (a receive error cannot say).

        The probes go out on a tag nobody receives on, so a probe to a live peer just stays pending; this runs only
        once the exchange has failed, which is why that is acceptable.
        """
        assert self._side is not None
        probe = torch.zeros(1, dtype=torch.uint8)
        lost = []
        for peer in range(self.world_size):
            if peer == self.rank:
                continue
            try:
                self._probes.append(self._side.send([probe], peer, _PROBE_TAG))
            except RuntimeError:
                lost.append(peer)
        return lost

    # -- the protocol ---------------------------------------------------------------------------------------------
    def step(self, step: int) -> None:
        """After optimizer step ``step``: mix what has arrived, then maybe push to a peer. Never waits for a peer."""
        self.counters.steps += 1
        self._quiescent = False
        if self.world_size == 1 or self._closed:
            return
        if self.survivors is not None:
            self.survivors.step = step
            self.survivors.refresh()  # a store read at most every REFRESH_SECONDS: learn of losses, drop the lost
        self._check_receiver()
        self._check_sends()
        if self._outer_step is not None and self._outer_step(step):
            # The outer optimizer's push (outer.py), to a uniformly random peer as the lock-step pairing: packed
            # before anything else is mixed in, while this rank's model still equals its new slow weights.
            self._push(_RANDOM_PEER, step)
            self._mix_arrived()
            return
        self._mix_arrived()
        if self.p > 0.0 and uniform(self.seed, step, self.rank, _STREAM_SEND) < self.p:
            self._push(self.topology, step)

    def _push(self, topology: Any, step: int) -> None:
        if len(self._sends_in_flight) >= self.max_sends_in_flight:
            self.counters.sends_skipped += 1
            return
        u = uniform(self.seed, step, self.rank, _STREAM_PEER)
        destination = self._draw_peer(topology, step, u)
        if destination is not None:
            self._send(destination)

    def _draw_peer(self, topology: Any, step: int, u: float) -> Optional[int]:
        """The topology's peer; after a loss, the topology over the survivors renumbered in rank order."""
        if self.survivors is None or not self._lost:
            return topology.peer(self.rank, self.world_size, step, u)
        alive = [r for r in self.survivors.alive if r not in self._lost]
        if len(alive) < 2:
            return None  # the last survivor: nobody to push to
        return alive[topology.peer(alive.index(self.rank), len(alive), step, u)]

    def _send(self, destination: int) -> None:
        # Halve first: the message carries a_i / 2 and this rank keeps a_i / 2, so no mass is created.
        self.state.weight /= 2.0
        with self._cond:
            buffer = self._free_send.pop() if self._free_send else None
        if buffer is None:
            buffer = self._new_host_message()
        self._pack(buffer, self._seq, _KIND_GOSSIP)
        self._seq += 1
        if not self._post(buffer, destination, "an asynchronous gossip send", weight=self.state.weight):
            return
        self._sent_to[destination] += 1
        self.counters.messages_sent += 1
        self.counters.bytes_sent += self.state.message_bytes

    def _pack(self, buffer: Tensor, seq: int, kind: float) -> None:
        if self._on_device:
            if self._staging is None:
                self._staging = self.state.new_message()
            self.state.pack(self._staging, seq, self.rank)
            buffer.copy_(self._staging)  # synchronous: the host buffer is complete before the send is posted
        else:
            self.state.pack(buffer, seq, self.rank)
        if kind != _KIND_GOSSIP:  # a gossip message keeps what the state wrote there (outer.py marks its payload)
            self._header(buffer)[_KIND_SLOT] = kind

    def _post(self, buffer: Tensor, destination: int, what: str, weight: float = 0.0) -> bool:
        """Post a send of ``buffer`` (carrying ``weight``); False if the peer is gone and on_peer_loss="continue"
        (the weight is back with this rank: the message never left)."""
        assert self._side is not None
        try:
            work = self._side.send([buffer], destination, _TAG)
        except RuntimeError as error:  # gloo refuses a send to a peer whose connection is closed
            if self.survivors is not None and weight > 0.0:
                self.state.absorb_weight(weight)
                self.counters.sends_returned += 1
                self._returned[destination] += 1
                self._returned_weight[destination] += weight
                self._refused[destination] += 1
                self.survivors.declare_lost(destination, f"a gossip push to it was refused: {_first_line(error)}")
                with self._cond:
                    self._free_send.append(buffer)
                return False
            self._failed = True
            raise peer_lost_error(self.rank, [destination], what, error) from error
        with self._cond:
            send_id = self._send_id
            self._send_id += 1
            self._sends_in_flight[send_id] = (destination, time.monotonic(), weight, work)
        self._send_queue.put((send_id, work, buffer, destination))
        return True

    def _complete_sends_loop(self) -> None:
        while True:
            item = self._send_queue.get()
            if item is None:
                return
            send_id, work, buffer, destination = item
            try:
                completed = work.wait()  # the side group's timeout never fires; the training thread judges the age
                failure: Optional[BaseException] = None if completed is not False else RuntimeError("aborted")
            except BaseException as error:  # noqa: BLE001 - handed to the training thread, which raises it
                failure = error
            if failure is not None and self.survivors is None:
                with self._cond:
                    if self._send_error is None:
                        self._send_error = (destination, failure)
                    self._cond.notify_all()
                return
            with self._cond:
                _, _, weight, _ = self._sends_in_flight.pop(send_id)
                if failure is None:
                    self._free_send.append(buffer)
                    self._delivered[destination] += 1
                    self._delivered_weight[destination] += weight
                else:  # on_peer_loss="continue": written in part at most, so never received (its buffer is dropped)
                    self._failed_sends.append((destination, weight, failure))
                self._cond.notify_all()

    def _check_sends(self, block_until: Optional[float] = None) -> None:
        """Raise for a failed send, or one that waited longer than the timeout, naming its peer.

        With ``block_until`` (a monotonic deadline), also wait for every send to complete (drain and close only).
        """
        timeout = self.timeout.total_seconds()
        while True:
            if self.survivors is not None:
                self._settle_failed_sends()  # without the lock: it may call the store and probe peers
            with self._cond:
                if self._send_error is not None:
                    self._failed = True
                    destination, error = self._send_error
                    raise peer_lost_error(
                        self.rank, [destination], "an asynchronous gossip send", error
                    ) from error
                now = time.monotonic()
                if self._sends_in_flight:
                    destination, posted, _, _ = min(self._sends_in_flight.values(), key=lambda entry: entry[1])
                    if now - posted > timeout or (block_until is not None and now > block_until):
                        self._failed = True
                        raise peer_lost_error(
                            self.rank, [destination], "an asynchronous gossip send",
                            TimeoutError(f"the peer did not take the message within {now - posted:.1f} s"),
                        )
                if block_until is None or not self._sends_in_flight:
                    return
                self._cond.wait(0.05)

    def _settle_failed_sends(self) -> None:
        """on_peer_loss="continue": give back the weight of pushes that failed (their receiver is gone: they never
        left), declare their receivers lost, and probe the receivers of pushes that wait long."""
        assert self.survivors is not None
        with self._cond:
            failed, self._failed_sends = self._failed_sends, []
            now = time.monotonic()
            waiting = sorted({dest for dest, posted, _, _ in self._sends_in_flight.values()
                              if now - posted > PROBE_AFTER_SECONDS})
        for destination, weight, error in failed:
            self.state.absorb_weight(weight)
            self.counters.sends_returned += 1
            self._returned[destination] += 1
            self._returned_weight[destination] += weight
            if destination not in self._lost and not self.survivors.check(
                [destination], "an asynchronous gossip push that failed", force=True
            ):
                self._failed = True
                raise peer_lost_error(self.rank, [destination], "an asynchronous gossip send", error) from error
        if waiting:
            self.survivors.check(waiting, "an asynchronous gossip push its receiver has not taken")
            self.survivors.refresh(force=True)

    def _peer_lost(self, peer: LostPeer) -> None:
        """A peer is lost (called on the thread that learned it): count no more of its messages (drop those that
        arrived and are not mixed yet: their weight is lost with it), and free what waits for it for ever (gloo
        does not fail a transfer that was under way when the connection closed: see survival.py, fact 3)."""
        rank = peer.rank
        with self._cond:
            if rank in self._lost:
                return
            self._lost.add(rank)
            self.counters.peers_lost += 1
            self._purge(rank)
            for destination, _, _, work in self._sends_in_flight.values():
                if destination == rank:
                    work.abort()  # the completion thread records it as returned
            current = self._current_receive
            if current is not None:
                work, buffer = current
                header = self._header(buffer).tolist()
                kind, sender = header[_KIND_SLOT], header[2]
                if kind != _KIND_UNFILLED and math.isfinite(sender) and int(sender) == rank:
                    work.abort()  # it was receiving the lost peer's message: it would never complete
            self._cond.notify_all()
        if self.survivors is not None and len(self.survivors.alive) > 1:
            alive = [r for r in self.survivors.alive if r not in self._lost]
            validate_topology(self.topology, len(alive))

    def _purge(self, rank: int) -> None:
        """Drop the messages from ``rank`` received and not mixed yet (``_cond`` held): they no longer count."""
        kept: deque[tuple[int, Tensor]] = deque()
        for source, message in self._arrived:
            if source == rank:
                self._received_from[rank] -= 1
                self._received_weight[rank] -= GossipState.read_header(message)[0]
                self._dropped[rank] += 1
                self._free_receive.append(message)
            else:
                kept.append((source, message))
        self._arrived = kept

    def _ledger(self) -> dict[str, list]:
        """The cumulative counts with every peer (``_cond`` held, or no other thread running)."""
        return {"delivered": list(self._delivered), "delivered_weight": list(self._delivered_weight),
                "received": list(self._received_from), "received_weight": list(self._received_weight),
                "returned": list(self._returned), "returned_weight": list(self._returned_weight),
                "dropped": list(self._dropped)}

    def _mix_arrived(self) -> None:
        while True:
            with self._cond:
                if not self._arrived:
                    return
                source, message = self._arrived.popleft()
            try:
                self._mix(source, message)
            finally:
                with self._cond:
                    self._free_receive.append(message)

    def _mix(self, source: int, message: Tensor) -> None:
        weight, seq, sender = GossipState.read_header(message)
        self.counters.messages_received += 1
        self.counters.bytes_received += self.state.message_bytes
        if self._on_device:
            if self._staging is None:
                self._staging = self.state.new_message()
            # Synchronous: the host buffer goes back to the receiver as soon as this message is mixed.
            self._staging.copy_(message)
            message = self._staging
        if self.check_finite and not self.state.payload_is_finite(message):
            self.counters.messages_rejected += 1
            text = (
                f"Rank {self.rank} received an asynchronous gossip message with NaN/Inf values from rank {sender} "
                f"(its message #{seq}); it was not mixed in (its gossip weight was kept so the total stays 1)."
            )
            self.state.absorb_weight(weight)
            if self.on_nonfinite == "error":
                raise NonFiniteGossipError(text)
            warnings.warn(text, RuntimeWarning, stacklevel=4)
            return
        self.state.mix(message, weight)

    def drain(self) -> None:
        """Quiescence (a collective over the group): bring every message in flight home and mix it.

        Every rank stops sending, the ranks all-reduce how many messages each sent to each, every rank waits (at
        most the timeout) until it has received what was sent to it and mixes it, and a barrier ends it, so no
        message sent after this drain can be mixed by a rank still in it. Afterwards sum_i a_i = 1 to rounding.
        """
        if self.world_size == 1 or self._closed:
            return  # closed: nothing is sent any more, and close() came after the last drain
        if self.survivors is not None:
            self._drain_surviving()
            return
        self._check_receiver()
        deadline = time.monotonic() + self.timeout.total_seconds()
        counts = torch.zeros(self.world_size, self.world_size, dtype=torch.int64)
        counts[self.rank] = torch.tensor(self._sent_to, dtype=torch.int64)
        self._drains += 1
        self._collective(
            "the all-reduce of asynchronous gossip message counts (quiescence)", counts, f"drain{self._drains}"
        )
        expected = counts[:, self.rank].tolist()
        with self._cond:
            while True:
                missing = [s for s in range(self.world_size) if self._received_from[s] < expected[s]]
                if not missing or self._receiver_error is not None:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._failed = True
                    owed = ", ".join(f"{expected[s] - self._received_from[s]} from rank {s}" for s in missing)
                    raise peer_lost_error(
                        self.rank, missing, "the quiescence of asynchronous gossip",
                        TimeoutError(f"messages still missing after {self.timeout.total_seconds():.0f} s: {owed}"),
                    )
                self._cond.wait(min(remaining, 1.0))
        self._check_receiver()
        self._mix_arrived()
        self._check_sends(block_until=deadline)
        self._collective("the barrier that ends asynchronous gossip quiescence", torch.zeros(1))
        # The consistent cut: until this rank steps again, what arrives is after the cut (see state_dict).
        self._quiescent = True

    def _drain_surviving(self) -> None:
        """Quiescence among the survivors (on_peer_loss="continue"), through the store: no collective over the old
        world, and a peer lost at any moment during it is accounted for at this cut.

        1. Every push of this rank has completed or come back (a push to a lost peer gives its weight back).
        2. Gather every rank's counts of pushes delivered to each peer; wait for what the others delivered to this
           rank, except from ranks recorded lost meanwhile (this rank reports those as *missing*); mix it all.
        3. Gather every rank's weight, the ranks it missed messages from, and its counts with every peer since the
           previous cut. The members of this cut are the ranks that posted, less the ranks any rank missed: every
           rank computes the same members from the same posts. The ranks of the previous cut that are not members
           are lost, with exactly their weight at the previous cut + the weight the members delivered to them - the
           weight the members received from them (:class:`~lightning_gossip.gossip.survival.LossAccount`).
        """
        survivors = self.survivors
        assert survivors is not None
        what = "the quiescence of asynchronous gossip"
        self._check_receiver()
        deadline = time.monotonic() + self.timeout.total_seconds()
        self._drains += 1
        name = f"drain{self._drains}"
        survivors.refresh(force=True)
        self._check_sends(block_until=deadline)
        with self._cond:
            delivered = list(self._delivered)
        posts = survivors.gather(f"{name}/sent", json.dumps(delivered), what)
        expected = {int(r): json.loads(v)[self.rank] for r, v in posts.items() if int(r) != self.rank}
        while True:
            with self._cond:
                waiting = [r for r, n in expected.items() if self._received_from[r] < n and r not in self._lost]
            if not waiting:
                break
            waited = self.timeout.total_seconds() - (deadline - time.monotonic())
            if time.monotonic() > deadline:
                self._failed = True
                raise peer_lost_error(self.rank, waiting, what, TimeoutError(
                    f"messages still missing after {self.timeout.total_seconds():.0f} s"))
            if waited > PROBE_AFTER_SECONDS:
                survivors.check(waiting, what)
            survivors.refresh(force=True)
            self._check_receiver()
            with self._cond:
                self._cond.wait(0.02)
        self._mix_arrived()
        with self._cond:
            missing = sorted(r for r, n in expected.items() if self._received_from[r] < n)
            ledger = self._ledger()
        since = {key: [now - then for now, then in zip(ledger[key], self._at_cut[key])] for key in ledger}
        post = {"weight": self.state.weight, "missing": missing, "since": since}
        done = {int(r): json.loads(v) for r, v in survivors.gather(f"{name}/done", json.dumps(post), what).items()}
        lost = (set(self._cut_members) - set(done)) | {r for entry in done.values() for r in entry["missing"]}
        members = sorted(set(done) - lost)
        if lost:
            survivors.refresh(force=True)  # every lost rank is recorded in the store by now: learn of them all
            with self._cond:
                for rank in lost:  # what arrived from them after this rank's post is not in the accounting
                    self._purge(rank)
                ledger = self._ledger()
            self._account(sorted(lost), members, {r: done[r]["since"] for r in members})
        for rank in members:
            self._cut_weights[rank] = float(done[rank]["weight"])
        self._cut_members = members
        self._at_cut = ledger
        # The consistent cut: until this rank steps again, what arrives is after the cut (see state_dict).
        self._quiescent = True

    def _account(self, lost: list[int], members: list[int], since: dict[int, dict[str, list]]) -> None:
        """Record what was lost with ``lost`` at this cut (the same numbers on every member)."""
        assert self.survivors is not None

        def total(key: str) -> Any:
            return sum(since[r][key][d] for r in members for d in lost)

        account = LossAccount(
            cut=self._drains, ranks=lost, survivors=members,
            weight_at_last_cut=sum(self._cut_weights[d] for d in lost),
            messages_delivered_to_lost=int(total("delivered")), weight_delivered_to_lost=float(total("delivered_weight")),
            messages_received_from_lost=int(total("received")),
            weight_received_from_lost=float(total("received_weight")),
            sends_returned=int(total("returned")), weight_returned=float(total("returned_weight")),
            messages_dropped=int(total("dropped")),
        )
        report = self.survivors.report
        report.accounts.append(account)
        for peer in report.lost:
            if peer.rank in lost and peer.last_known_weight is None:
                peer.last_known_weight = self._cut_weights[peer.rank]
        log.warning(
            "Rank %d: gossip weight lost with rank(s) %s: %.17g (their weight at the last cut %.6g + %d message(s) "
            "delivered to them, weight %.6g - %d received from them, weight %.6g; %d push(es) to them came back, "
            "weight %.6g; %d of their messages dropped). Survivors: %s; their weights now sum to %.17g.",
            self.rank, lost, account.weight_lost, account.weight_at_last_cut, account.messages_delivered_to_lost,
            account.weight_delivered_to_lost, account.messages_received_from_lost, account.weight_received_from_lost,
            account.sends_returned, account.weight_returned, account.messages_dropped, members,
            1.0 - report.weight_lost,
        )

    # -- what the averager reads and sets at a cut (on_peer_loss="continue") ---------------------------------------
    @property
    def cut_members(self) -> list[int]:
        """The ranks of the last consistent cut (every collective at this cut must have exactly them)."""
        return list(self._cut_members)

    def weights_reset(self, weight: float, members: list[int]) -> None:
        """Every member now holds gossip weight ``weight`` (the averager's consensus_ at a cut)."""
        for rank in members:
            self._cut_weights[rank] = weight

    def messages_with_lost(self) -> tuple[int, int]:
        """(pushes this rank made to peers now lost, messages it counted from them), for the messages invariant."""
        with self._cond:
            sent = sum(self._delivered[r] + self._returned[r] - self._refused[r] for r in self._lost)
            received = sum(self._received_from[r] for r in self._lost)
        return sent, received

    def _collective(self, what: str, tensor: Tensor, checkpoint: Optional[str] = None) -> None:
        """An all-reduce over the control group that names the rank(s) that never came, if it fails.

        A collective cannot say who is missing, so with ``checkpoint`` every rank first records its arrival in the
        default store; a failed all-reduce then names the ranks that did not arrive (hung or dead).
        """
        store = None
        if checkpoint is not None:
            try:
                store = gossip_store()  # calls bounded: its host may be the rank that hangs
                store.set(self._key(checkpoint, self.rank), "1")
            except Exception:  # noqa: BLE001 - naming the culprit is a courtesy; the all-reduce decides
                store = None
        try:
            with collective_guard(what, self._control):
                dist.all_reduce(tensor, group=self._control)
        except GossipPeerError as error:
            self._failed = True
            missing = self._absent(store, checkpoint) if store is not None else []
            if missing:
                raise peer_lost_error(self.rank, missing, what, error.__cause__ or error) from error
            raise

    def _key(self, checkpoint: str, rank: int) -> str:
        return f"lightning_gossip/async/{self._uid}/{checkpoint}/{rank}"

    def _absent(self, store: Any, checkpoint: Optional[str]) -> list[int]:
        try:
            bounded = store.with_deadline(2.0)
            return [r for r in range(self.world_size) if not bounded.check([self._key(checkpoint, r)])]
        except Exception:  # noqa: BLE001 - the store lives in rank 0's process, which may be the one lost
            return []

    def in_flight_messages(self) -> list[Tensor]:
        """Messages received and not mixed in yet (their mass counts in the exact mean).

        Messages still on the wire are not here: call :meth:`drain` first where the exact mean matters.
        """
        self._check_receiver()
        with self._cond:
            messages = [message for _, message in self._arrived]
        if self._on_device:
            messages = [message.to(self.state.device) for message in messages]
        return messages

    def in_flight_weight(self) -> float:
        """The gossip weight of the messages this rank has received and not mixed in yet."""
        with self._cond:
            return sum(GossipState.read_header(message)[0] for _, message in self._arrived)

    def state_dict(self) -> dict[str, Any]:
        """Counters and the messages received but not mixed in yet, as ``(sequence number, sender, message)``.

        Right after :meth:`drain` (the consistent cut every checkpoint is taken at) nothing before the cut is in
        flight, so ``in_flight`` is empty; a message that arrives after the cut (a faster peer already training again)
        belongs to the next cut: its mass is in neither its sender's saved weight nor this rank's. Called without a
        drain, the messages received so far are saved, but messages on the wire are not: not a consistent cut.
        """
        if self._quiescent:
            arrived = []
        else:
            with self._cond:
                arrived = [(source, message.clone()) for source, message in self._arrived]
        state = {
            "counters": self.counters.as_dict(),
            "in_flight": [(int(GossipState.read_header(m)[1]), source, m) for source, m in arrived],
            "asynchronous": {"seq": self._seq, "consistent": self._quiescent},
        }
        if self.survivors is not None:
            state["survival"] = {"report": self.survivors.report.as_dict(), "members": self.cut_members,
                                 "weights": list(self._cut_weights)}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counters = GossipCounters(**state.get("counters", {}))
        messages = []
        for entry in state.get("in_flight", []):
            source, message = int(entry[-2]), entry[-1]  # (seq or step, sender, message), as the lock-step exchange
            if message.dtype != torch.uint8 or message.numel() != self.state.message_bytes:
                raise ValueError(
                    f"A gossip message in flight in this checkpoint (from rank {source}) has {message.numel()} "
                    f"{message.dtype} elements, but this run's messages are {self.state.message_bytes} bytes: resume "
                    "with the model, mix_buffers and transfer_dtype the checkpoint was written with."
                )
            buffer = self._new_host_message()
            buffer.copy_(message)
            messages.append((source, buffer))
        with self._cond:
            # Mixed at the next step; the per-peer counts stay this run's, so drain's accounting is unaffected.
            self._arrived.extendleft(reversed(messages))
        survival = state.get("survival")
        if survival is not None and self.survivors is not None:
            lost = [peer["rank"] for peer in survival["report"]["lost"]]
            if lost:
                raise ValueError(
                    f"This gossip state was saved after rank(s) {lost} were lost; their states are gone, so the run "
                    "cannot be resumed rank by rank. Start every rank from the checkpoint's consensus instead (the "
                    "Lightning adapters do so by themselves)."
                )
            self._cut_members = list(survival["members"])
            self._cut_weights = [float(w) for w in survival["weights"]]
        extra = state.get("asynchronous") or {}
        self._seq = int(extra.get("seq", 0))
        if "sends_skipped" in extra:  # checkpoints written before it became a counter
            self.counters.sends_skipped = int(extra["sends_skipped"])

    def close(self, clean: bool = True) -> None:
        """Stop the receiver thread and release the buffers. Idempotent.

        When every rank closes together after a healthy run (the averager's end()), each sends a stop message to the
        next rank of a ring after a barrier that proves every gossip message was taken, and joins its receiver. A
        rank that already failed, or whose peers are gone, leaves the daemon receiver thread blocked: it cannot
        keep the interpreter from exiting. Messages received and not mixed in are dropped: drain() first.
        ``clean=False`` skips the collective part (after an exception, when other ranks may be gone or elsewhere).
        """
        if self._closed:
            return
        self._closed = True
        thread = self._thread
        if not clean:
            self._failed = True
        if thread is None or not thread.is_alive() or self._failed or self._receiver_error is not None:
            self._release()
            return
        try:
            if self.survivors is not None:
                self._close_surviving(thread)
                return
            self._check_sends(block_until=time.monotonic() + self.timeout.total_seconds())
            self._collective("the barrier before stopping the asynchronous gossip receivers", torch.zeros(1))
            stop = self._new_host_message()
            stop.zero_()
            self._header(stop)[2] = float(self.rank)
            self._header(stop)[_KIND_SLOT] = _KIND_STOP
            self._post(stop, (self.rank + 1) % self.world_size, "the stop message of the asynchronous gossip")
            self._check_sends(block_until=time.monotonic() + self.timeout.total_seconds())
            thread.join(self.timeout.total_seconds())
        except GossipPeerError as error:
            # close() runs in teardown, often after another error: report, never mask it; the daemon threads stay.
            self._failed = True
            warnings.warn(f"Asynchronous gossip could not stop its receiver cleanly: {error}", RuntimeWarning)
        finally:
            self._release()

    def _close_surviving(self, thread: threading.Thread) -> None:
        """close() among the survivors: a gather instead of the barrier, then the stop ring over the ranks that
        came (a peer lost after the gather only means a stop that is not sent, or not received)."""
        survivors = self.survivors
        assert survivors is not None
        deadline = time.monotonic() + self.timeout.total_seconds()
        self._check_sends(block_until=deadline)
        ring = sorted(survivors.gather("close", "1", "the end of asynchronous gossip"))
        if len(ring) > 1:
            index = ring.index(self.rank)
            following, previous = ring[(index + 1) % len(ring)], ring[index - 1]
            stop = self._new_host_message()
            stop.zero_()
            self._header(stop)[2] = float(self.rank)
            self._header(stop)[_KIND_SLOT] = _KIND_STOP
            try:
                _wait_bounded(self._side.send([stop], following, _TAG), deadline)  # type: ignore[union-attr]
            except RuntimeError:
                pass  # the following rank is gone: its receiver went with it
            while thread.is_alive() and time.monotonic() < deadline:
                thread.join(0.1)
                survivors.refresh()
                if previous in survivors.lost:
                    break  # its stop will never come; the daemon receiver stays blocked, harmlessly
        survivors.close(clean=True)

    def _release(self) -> None:
        self._staging = None
        if not self._failed and self._completer is not None:
            self._send_queue.put(None)  # every send completed: the completion thread ends
            # ... and is joined: until it returns it holds the last send's gloo work. Left running, it could drop that
            # after the caller's dist.destroy_process_group() (the usual next line), which now and then aborted the
            # process ("terminate called without an active exception", examples/torch_loop.py under torchrun).
            self._completer.join(self.timeout.total_seconds())
        with self._cond:
            self._free_send = []
            self._free_receive = []
            self._arrived = deque()

    @property
    def receiver_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()


def _wait_bounded(work: Any, deadline: float) -> bool:
    """Wait for a gloo send until the monotonic ``deadline`` on a daemon thread (a gloo wait with a timeout that
    expires closes every connection of its group). Returns whether it completed; raises if it failed."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["done"] = work.wait()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            box["error"] = error

    waiter = threading.Thread(target=target, daemon=True, name="gossip-bounded-wait")
    waiter.start()
    waiter.join(max(0.0, deadline - time.monotonic()))
    if "error" in box:
        raise box["error"]
    return bool(box.get("done", False))


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:200]


def async_exchange_factory(state: GossipState, options: Any, group: Any, schedule: Any) -> AsyncGossipExchange:
    """``GossipAverager(..., exchange=async_exchange_factory)``."""
    return AsyncGossipExchange(state, options, group, schedule)
