"""Surviving a lost peer in asynchronous gossip: ``GossipOptions(asynchronous=True, on_peer_loss="continue")``.

Push-sum makes a lost peer survivable: the peer takes its gossip weight with it, the survivors' weights no longer
sum to 1, but their weighted mean is still the consensus of what is left, and in asynchronous mode nobody has to
wait for anybody during training. What it takes is agreeing on who is gone, never waiting for the dead again, and
accounting for exactly what was lost. This module holds the membership of a run (who is alive, agreed through the
process group's store), the agreement primitives the survivors use instead of collectives over the old world, and
the report of what was lost; :class:`~lightning_gossip.gossip.async_exchange.AsyncGossipExchange` does the message
accounting with them, and :class:`~lightning_gossip.gossip.work_sharing.WorkSharingSampler` re-queues a lost rank's
unfinished data.

What gloo does when a member of a group is SIGKILLed (measured with torch 2.13's gloo on 127.0.0.1, 4 ranks; the
exploratory experiment is ``experiments/reliability/gloo_facts.py``; ``tests/distributed/test_survival.py`` checks
the behaviour built on these facts, not the facts one by one):

1. A ``recv_anysource`` that is posted and not yet matched to a message is *not* affected: it stays pending and
   later receives a survivor's message normally. Sends between survivors on the same group keep working.
2. A send to the dead rank posted afterwards raises at once (``Connection closed by peer``), as does a receive
   from it; a send that was waiting for the dead rank's receive raises in ``wait()``. ``Work.is_completed()`` of a
   gloo send stays False until ``wait()`` is called, even after the failure: there is no non-blocking completion test.
3. A ``recv_anysource`` that was *in the middle of reading* the dead rank's message never completes and never
   fails: gloo's pair signals the operations queued on it when its connection closes, but not the one it is reading
   into (``tcp/pair.cc``: ``signalException`` walks ``localPendingRecv_``, not ``rx_``). Its receiver must be freed
   with ``Work.abort()``, which is safe only for that case: an aborted receive that is still registered as pending
   would later swallow a live peer's message (``findRecvFromAny`` does not skip expired buffers). So a receive is
   aborted only when its buffer's header, written before the receive was posted, shows that the dead rank's message
   had started to arrive in it. (A receive stuck before the first 32 bytes of the message had arrived cannot be told
   from a pending one; that rank's receiver then stays stuck, and its peers' sends to it time out naming it.)
   Likewise a send to the dead rank that was being written when the connection closed never completes: it is
   aborted once the peer is declared lost (a send that could not be written whole never reached the peer, so its
   weight goes back to the sender).
4. A collective over a group with a dead member raises ``Connection closed by peer`` on the ranks that talk to it
   (all 3 survivors of a 4-rank all-reduce within 0.15 s); a rank that only waits for live ranks which gave up waits
   for the group's timeout. Any gloo wait that times out closes *every* connection of its group.
5. The store keeps working as long as its host lives (rank 0 under Lightning's and Fabric's launchers, the agent
   under torchrun, whoever created the ``TCPStore`` otherwise). ``dist.new_group(survivors,
   use_local_synchronization=True)`` builds a working group of the survivors in about 30 ms (only its members
   take part). A ``TCPStore`` client serialises its calls, so a call that waits (a group being built waits for its
   members' addresses) holds up every other thread using the same client: the survivors' bookkeeping uses a
   client of its own (``store.clone()``).

The design that follows from these facts:

* **Evidence, not timeouts.** A peer is declared lost only on evidence that its connection is closed: a send to it
  raising, or a *probe* (a one-byte send on a tag of its own, taken by every rank's probe receiver) raising at once.
  A slow or hung peer is never declared lost (a hang still ends the run at the timeout, as in ``"fail"`` mode).
* **The store decides.** The first rank with evidence records the loss (``compare_set``), appends it to the run's
  list of lost ranks and counts it; every rank reads that count at most every :data:`REFRESH_SECONDS` while training
  and whenever it waits, so all ranks learn of a loss within a second and stop drawing it as a peer.
* **Agreement without the old world.** Quiescence, the epoch's end and every collective of the survivors start with
  :meth:`Survivors.gather`: every rank posts a value in the store and waits for every rank it believes alive (and
  probes those that keep it waiting); the result is the values of *every rank that posted*, which all ranks see
  the same (a rank that stops the wait for a peer does so only once that peer is recorded lost, which happens after
  it died, which happens after anything it posted; and the posts of lost ranks are read again at the end).
* **Collectives of the survivors** (:meth:`Survivors.run`): the members are agreed by a gather, the collective runs
  on a thread of its own over a group of exactly those members, while the caller watches the store; a loss among the
  members abandons it (a collective that lost a member may wait for the group's timeout, fact 4), and a second gather
  agrees on whether every member succeeded. If not, :class:`ViewChanged` tells the caller to start again (the
  averager redoes the consistent cut, then the collective).

Plain torch.distributed: no Lightning import.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional, Sequence

import torch
import torch.distributed as dist

from lightning_gossip.gossip.errors import GossipPeerError, record_first_failure
from lightning_gossip.gossip.groups import group_ranks

log = logging.getLogger("lightning_gossip.survival")

#: How often a training rank reads the store's count of lost peers (a store call), at most.
REFRESH_SECONDS = 0.5
#: A peer that keeps a rank waiting this long (in a gather, or a push it has not taken) is probed.
PROBE_AFTER_SECONDS = 0.5
#: A peer is probed at most this often.
PROBE_EVERY_SECONDS = 1.0
_PING = 0
_STOP = 1


class ViewChanged(RuntimeError):
    """A peer was declared lost while the survivors ran something together: it must be run again among the new
    survivors (the averager does so, after a new consistent cut)."""


@dataclass
class LostPeer:
    """One lost rank, as the store recorded it.

    ``declared_by`` is the rank that found the evidence, ``at_step`` that rank's gossip step then, ``evidence`` what it
    saw; ``last_known_weight`` the lost rank's gossip weight at the last consistent cut it took part in (filled in
    when the loss is accounted for), ``declared_at`` the wall-clock time of the declaration.
    """

    rank: int
    declared_by: int
    at_step: int
    evidence: str
    declared_at: float
    last_known_weight: Optional[float] = None


@dataclass
class LossAccount:
    """What the survivors found missing at the first consistent cut after losing ``ranks``.

    Since the cut before (when every rank's weight was known, nothing in flight), mass moved only by messages, so the
    weight lost with ``ranks`` is exactly their weight at that cut, plus the weight the survivors delivered to them,
    less the weight the survivors received from them. Pushes to them that failed never left (their weight went back
    to the sender: ``sends_returned``); their pushes that never arrived, or arrived after a survivor learned of the loss
    (``messages_dropped``), are in the lost weight. ``survivors`` are the ranks left after the cut.
    """

    cut: int
    ranks: list[int]
    survivors: list[int]
    weight_at_last_cut: float
    messages_delivered_to_lost: int
    weight_delivered_to_lost: float
    messages_received_from_lost: int
    weight_received_from_lost: float
    sends_returned: int
    weight_returned: float
    messages_dropped: int

    @property
    def weight_lost(self) -> float:
        return self.weight_at_last_cut + self.weight_delivered_to_lost - self.weight_received_from_lost


@dataclass
class PeerLossReport:
    """Every peer lost in this run and what was lost with it (``averager.loss_report``; saved in checkpoints)."""

    lost: list[LostPeer] = field(default_factory=list)
    accounts: list[LossAccount] = field(default_factory=list)

    @property
    def lost_ranks(self) -> list[int]:
        return [peer.rank for peer in self.lost]

    @property
    def weight_lost(self) -> float:
        """The gossip weight lost with every lost peer so far (accounted at consistent cuts): the survivors' weights
        sum to ``1 - weight_lost`` (float64 rounding) at every consistent cut."""
        return sum(account.weight_lost for account in self.accounts)

    def as_dict(self) -> dict[str, Any]:
        return {"lost": [asdict(peer) for peer in self.lost], "accounts": [asdict(a) for a in self.accounts],
                "weight_lost": self.weight_lost}

    @classmethod
    def from_dict(cls, state: Optional[dict[str, Any]]) -> PeerLossReport:
        if not state:
            return cls()
        return cls([LostPeer(**peer) for peer in state.get("lost", [])],
                   [LossAccount(**account) for account in state.get("accounts", [])])

    def summary(self) -> str:
        if not self.lost:
            return "no peer lost"
        parts = []
        for peer in self.lost:
            weight = "" if peer.last_known_weight is None else f", weight {peer.last_known_weight:.6g} at the last cut"
            parts.append(f"rank {peer.rank} (declared by rank {peer.declared_by} at its step {peer.at_step}: "
                         f"{peer.evidence}{weight})")
        return f"lost {', '.join(parts)}; gossip weight lost {self.weight_lost:.6g}"


def _store_failure(rank: int, what: str, error: BaseException) -> GossipPeerError:
    text = (
        f"Rank {rank} lost the process group's store during {what} ({type(error).__name__}: {error}). The store lives "
        "in one process (rank 0 under Lightning's and Fabric's launchers, the agent under torchrun, whoever created "
        "the TCPStore otherwise); a run cannot survive losing it, even with on_peer_loss='continue'."
    )
    return GossipPeerError(text, rank, [])


class Survivors:
    """Which ranks of a gossip group are alive, agreed through the store, and the survivors' ways to agree.

    Args:
        group: the gossip group (``None``: the default group); its ranks are the ranks used here.
        side_group: a gloo group over the same ranks, where the probes travel (the exchange's message group).
        prefix: the store key prefix of this run, the same on every rank and new for every run.
        timeout: how long a rank waits for a live peer (in a gather) before the run fails naming it.
        probe_tag: the tag of the probes on ``side_group`` (no other message may use it).
    """

    def __init__(self, group: Optional[dist.ProcessGroup], side_group: Any, prefix: str, timeout: timedelta,
                 probe_tag: int) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._global = group_ranks(group)
        self._side = side_group
        self._prefix = prefix
        self.timeout = timeout
        self._probe_tag = probe_tag
        #: The ranks believed alive, ascending (this rank included).
        self.alive: list[int] = list(range(self.world_size))
        self.report = PeerLossReport()
        self._listeners: list[Callable[[LostPeer], None]] = []
        self._seen = 0  # the store's count of losses as of this rank's last read
        self._next_refresh = 0.0
        self._ops = 0
        self._groups: dict[tuple[int, ...], Any] = {}
        self._last_probe: dict[int, float] = {}
        self.step = 0  # the gossip step this rank is at (set by the exchange; for the report)
        # A client of its own: a store call that waits (a group being built) holds up a client's other callers.
        self._store = dist.distributed_c10d._get_default_store().clone()
        self._ping = torch.full((1,), _PING, dtype=torch.uint8)
        # Probe sends in flight: each must stay referenced until it completed (gloo holds only a weak pointer to its
        # buffer, and a send whose buffer is gone would block every later send to that peer), so a thread waits for
        # them in turn; a probe to a hung peer only holds up this thread.
        self._probes: queue.SimpleQueue = queue.SimpleQueue()
        self._probe_thread: Optional[threading.Thread] = None
        if self.world_size > 1:
            self._probe_thread = threading.Thread(target=self._take_probes, daemon=True,
                                                  name=f"gossip-probe-receiver-rank{self.rank}")
            self._probe_thread.start()
            threading.Thread(target=self._complete_probes, daemon=True,
                             name=f"gossip-probe-sends-rank{self.rank}").start()

    # -- the store ------------------------------------------------------------------------------------------------
    def store(self) -> dist.Store:
        """The survivors' own store client (work sharing uses it too after a loss, for the same reason)."""
        return self._store

    def _key(self, *parts: Any) -> str:
        return "/".join([self._prefix, *(str(p) for p in parts)])

    def _call(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except GossipPeerError:
            raise
        except Exception as error:  # noqa: BLE001 - DistStoreError, RuntimeError: the store's host is gone
            raise _store_failure(self.rank, what, error) from error

    # -- membership -----------------------------------------------------------------------------------------------
    @property
    def lost(self) -> list[int]:
        return self.report.lost_ranks

    @property
    def any_lost(self) -> bool:
        return bool(self.report.lost)

    def on_loss(self, listener: Callable[[LostPeer], None]) -> None:
        """Call ``listener(peer)`` on the thread that learns of each loss (the training thread), before anything
        else happens (the exchange stops counting the peer's messages and gives back the weight of pushes to it)."""
        self._listeners.append(listener)

    def global_rank(self, rank: int) -> int:
        return self._global[rank]

    def refresh(self, force: bool = False) -> bool:
        """Read the store's count of lost peers (at most every :data:`REFRESH_SECONDS` unless ``force``) and apply
        new losses; returns whether there were any. Raises if this rank itself was declared lost."""
        now = time.monotonic()
        if not force and now < self._next_refresh:
            return False
        self._next_refresh = now + REFRESH_SECONDS
        store = self._store
        count = int(self._call("a read of the lost peers", lambda: store.add(self._key("losses"), 0)))
        if count <= self._seen:
            return False
        self._seen = count
        listed = self._call("a read of the lost peers", lambda: store.get(self._key("lost_list")).decode())
        changed = False
        for entry in listed.split(","):
            if entry and int(entry) not in self.lost:
                info = json.loads(self._call("a read of a lost peer", lambda: store.get(self._key("lost", entry))))
                self._apply(LostPeer(rank=int(entry), **info))
                changed = True
        return changed

    def _apply(self, peer: LostPeer) -> None:
        if peer.rank == self.rank:
            text = (f"Rank {self.rank} was declared lost by rank {peer.declared_by} ({peer.evidence}); the others "
                    "carry on without it and a lost rank cannot rejoin a run, so it stops.")
            raise GossipPeerError(text, self.rank, [self.rank])
        self.report.lost.append(peer)
        self.alive = [r for r in self.alive if r != peer.rank]
        log.warning("Rank %d: gossip peer rank %d is lost (declared by rank %d at its step %d: %s); carrying on "
                    "with ranks %s.", self.rank, peer.rank, peer.declared_by, peer.at_step, peer.evidence, self.alive)
        for listener in self._listeners:
            listener(peer)

    def declare_lost(self, peer: int, evidence: str) -> None:
        """Record ``peer`` as lost in the store (the first declaration wins; later ones change nothing), then learn
        of it (and of any other new loss) here."""
        if peer in self.lost or peer == self.rank:
            return
        info = json.dumps({"declared_by": self.rank, "at_step": self.step, "evidence": evidence,
                           "declared_at": time.time()})
        store = self._store
        current = self._call("the declaration of a lost peer",
                             lambda: store.compare_set(self._key("lost", peer), "", info).decode())
        if current == info:  # this rank was first
            self._call("the declaration of a lost peer", lambda: store.append(self._key("lost_list"), f"{peer},"))
            self._call("the declaration of a lost peer", lambda: store.add(self._key("losses"), 1))
            record_first_failure(f"rank {self.rank} lost gossip peer rank {peer} ({evidence}); the survivors carry on")
        self.refresh(force=True)

    # -- probes ---------------------------------------------------------------------------------------------------
    def _take_probes(self) -> None:
        """The probe receiver: keeps a one-byte receive posted on the probe tag, so probes to a live rank complete."""
        failures = 0
        while True:
            byte = torch.zeros(1, dtype=torch.uint8)
            try:
                work = self._side.recv_anysource([byte], self._probe_tag)
                if not work.wait():
                    continue
            except Exception:  # noqa: BLE001 - a probe from a peer that died mid-message; keep receiving
                failures += 1
                if failures > 1000:
                    return
                time.sleep(0.01)
                continue
            if int(byte) == _STOP:
                return

    def _complete_probes(self) -> None:
        while True:
            work = self._probes.get()
            if work is None:
                return
            try:
                work.wait()
            except Exception:  # noqa: BLE001 - the peer died after the probe was posted: the next probe will say so
                pass

    def probe(self, peers: Sequence[int]) -> list[int]:
        """The peers whose connection is closed (a send to them fails at once); the others are left alone."""
        dead = []
        now = time.monotonic()
        for peer in peers:
            if peer == self.rank or peer in self.lost:
                continue
            if now - self._last_probe.get(peer, -1e9) < PROBE_EVERY_SECONDS:
                continue
            self._last_probe[peer] = now
            try:
                self._probes.put(self._side.send([self._ping], peer, self._probe_tag))
            except RuntimeError:
                dead.append(peer)
        return dead

    def check(self, peers: Sequence[int], what: str, force: bool = False) -> list[int]:
        """Probe ``peers`` and declare the dead ones lost (``force``: even if probed within the last second)."""
        if force:
            for peer in peers:
                self._last_probe.pop(peer, None)
        dead = self.probe(peers)
        for peer in dead:
            self.declare_lost(peer, f"its connection is closed (found by a probe during {what})")
        return dead

    # -- agreement ------------------------------------------------------------------------------------------------
    def gather(self, name: str, value: str, what: str) -> dict[int, str]:
        """Post ``value`` under ``name`` and return every rank's posted value, once every rank believed alive has
        posted or is recorded lost. Every rank gets the same result (see the module docstring): the values of the
        ranks that posted, which may include a rank lost just after it posted. Waits at most the timeout for a live
        rank (then the run fails naming it: a hang is not a loss)."""
        store = self._store
        self._call(what, lambda: store.set(self._key("gather", name, self.rank), value))
        results = {self.rank: value}
        pending = [r for r in self.alive if r != self.rank]
        start = time.monotonic()
        delay = 0.001
        while True:
            still = []
            for peer in pending:
                if peer in self.lost:
                    continue
                key = self._key("gather", name, peer)
                if self._call(what, lambda: store.check([key])):
                    results[peer] = self._call(what, lambda: store.get(key).decode())
                else:
                    still.append(peer)
            pending = still
            if not pending:
                break
            waited = time.monotonic() - start
            self.refresh(force=True)
            if waited > PROBE_AFTER_SECONDS:
                self.check(pending, what)
            if waited > self.timeout.total_seconds():
                text = (f"Rank {self.rank} waited {waited:.0f} s for rank(s) {pending} in {what}; they are alive "
                        "(their connections are open) but did not come: a hung peer ends the run even with "
                        "on_peer_loss='continue'.")
                raise GossipPeerError(text, self.rank, pending)
            time.sleep(delay)
            delay = min(2 * delay, 0.05)
        # A rank recorded lost may have posted before it died: read every missing post once more, so every rank
        # ends with the same values whether it saw the post while waiting or learned of the loss first.
        for peer in range(self.world_size):
            if peer not in results:
                key = self._key("gather", name, peer)
                if self._call(what, lambda: store.check([key])):
                    results[peer] = self._call(what, lambda: store.get(key).decode())
        return results

    def run(self, what: str, fn: Callable[[Any], Any], members: Optional[Sequence[int]] = None) -> Any:
        """``fn(group)`` as one collective of the survivors; returns its result on every rank, or raises
        :class:`ViewChanged` on every rank if a member was lost (run it again, after a new consistent cut).

        The members are the ranks that reach this call (a gather); ``fn`` runs over a group of exactly them (the
        gossip group while nobody is lost), on a thread of its own while this one watches for a member's loss;
        then a second gather agrees on whether every member succeeded. ``members``: the ranks that must take part
        (those of the consistent cut ``fn`` reads); if others come, ``fn`` is not run and :class:`ViewChanged` says
        that the cut is out of date.
        """
        self.refresh(force=True)
        self._ops += 1
        op = self._ops
        entered = sorted(int(r) for r in self.gather(f"op{op}/enter", "1", what))
        outcome: tuple[str, Any] = ("no", None)
        try:
            if members is not None and entered != sorted(members):
                raise ViewChanged(f"the members of the cut changed before {what}")
            group = self._group_for(entered, what)
            outcome = ("ok", self._watched(lambda: fn(group), entered, what))
        except ViewChanged:
            outcome = ("no", None)
        except Exception as error:  # noqa: BLE001 - a member may have died in it: look for evidence
            self.check([r for r in entered if r != self.rank], what, force=True)
            outcome = ("error", error)
        votes = self.gather(f"op{op}/vote", "ok" if outcome[0] == "ok" else "no", f"the agreement after {what}")
        if outcome[0] == "ok" and set(votes) == set(entered) and all(v == "ok" for v in votes.values()):
            return outcome[1]
        self.refresh(force=True)
        if any(r in self.lost for r in entered) or set(votes) != set(entered) or (
            members is not None and entered != sorted(members)
        ):
            raise ViewChanged(f"a peer was lost during {what}")
        if outcome[0] == "error":
            raise outcome[1]
        failed = sorted(r for r, v in votes.items() if v != "ok")
        raise GossipPeerError(f"Rank(s) {failed} failed in {what} (no peer was lost): see their logs.", self.rank,
                              failed)

    def _group_for(self, members: list[int], what: str) -> Any:
        """The process group of exactly ``members``: the gossip group while nobody is lost, else one built for them
        (once per set of members; on the watched thread, since a member lost meanwhile would leave it waiting)."""
        if len(members) == self.world_size:
            return self.group
        key = tuple(members)
        if key not in self._groups:
            ranks = [self._global[r] for r in members]
            self._groups[key] = self._watched(
                lambda: dist.new_group(ranks, use_local_synchronization=True, timeout=self.timeout),
                members, f"building the group of the survivors for {what}")
        return self._groups[key]

    def _watched(self, fn: Callable[[], Any], members: Sequence[int], what: str) -> Any:
        """``fn()`` on a thread of its own; raises :class:`ViewChanged` (leaving the thread behind, blocked in a
        collective that lost a member) if a member is recorded lost before it returns."""
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                box["value"] = fn()
            except BaseException as error:  # noqa: BLE001 - handed to the caller
                box["error"] = error

        thread = threading.Thread(target=target, daemon=True, name=f"gossip-survivors-rank{self.rank}")
        thread.start()
        delay = 0.0005
        while True:
            thread.join(delay)
            if not thread.is_alive():
                break
            delay = min(2 * delay, 0.02)
            self.refresh(force=True)
            if any(r in self.lost for r in members):
                raise ViewChanged(f"a member was lost during {what}")
        if "error" in box:
            raise box["error"]
        return box.get("value")

    # -- the end --------------------------------------------------------------------------------------------------
    def close(self, clean: bool) -> None:
        """Stop the probe receivers (``clean``: every survivor closes together: a stop to the next survivor's)."""
        thread = self._probe_thread
        if thread is None or not thread.is_alive() or not clean or len(self.alive) < 2:
            return
        following = self.alive[(self.alive.index(self.rank) + 1) % len(self.alive)]
        try:
            stop = torch.full((1,), _STOP, dtype=torch.uint8)
            self._side.send([stop], following, self._probe_tag).wait()
        except RuntimeError:
            return  # the next survivor is gone: its receiver went with it
        thread.join(5.0)
