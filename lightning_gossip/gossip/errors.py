"""The errors gossip raises, and a lost peer turned into a clear error instead of a hang or an anonymous backend
message.

When a rank dies (SIGKILL, out of memory, a crash on another machine), gloo reports it to the ranks that talk to it
as ``RuntimeError: ... Connection reset by peer`` / ``Connection closed by peer``, and a rank that hangs as
``Timed out waiting ...ms`` once the process-group timeout has passed (NCCL raises ``DistBackendError``, also a
``RuntimeError``). Neither names the rank that was lost. Gossip knows whom each exchange involves, so it re-raises
these as :class:`GossipPeerError` naming the peer rank(s); for collectives over all ranks it names the lost rank when
there is only one other rank and otherwise says which operation failed.

A lost rank cascades: its peers stop, and then their peers see *them* vanish. So the first rank to see a lost peer
records that in the process group's key-value store (best effort, two seconds at most), and every later error quotes
it: each rank's error then names the rank that was lost first, not only the neighbour that stopped after it.

A rank that hangs is told apart from one that is merely waiting by the heartbeats of
:mod:`~lightning_gossip.gossip.health`: every error built here asks them first, and names the hung (or, on this host,
dead) rank, whichever rank this one happened to be waiting for.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator, Optional, Sequence

import torch.distributed as dist

from lightning_gossip.gossip import health


class GossipScheduleError(RuntimeError):
    """Ranks disagree about the gossip step: they took different numbers of optimizer steps."""


class NonFiniteGossipError(FloatingPointError):
    """A received gossip message held NaN or Inf and ``on_nonfinite='error'`` was asked for."""


class GossipInvariantError(RuntimeError):
    """An invariant of gossip does not hold (checked with ``GossipOptions(verify=True)``).

    ``invariant`` names it (``"mass"``, ``"mean"``, ``"messages"``, ``"coverage"``, ``"slow weights"``); ``ranks`` are the ranks whose
    values break it (empty when the violation is global).
    """

    def __init__(self, invariant: str, message: str, ranks: Sequence[int] = ()) -> None:
        super().__init__(f"Gossip invariant '{invariant}' violated: {message}")
        self.invariant = invariant
        self.ranks = list(ranks)


class GossipPeerError(RuntimeError):
    """A gossip exchange or collective failed: a peer rank died, hung past the timeout or lost its connection.

    ``rank`` is the rank that raised; ``peers`` the rank(s) it was waiting for (empty when unknown).
    """

    def __init__(self, message: str, rank: int, peers: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.rank = rank
        self.peers = list(peers)


def _detail(error: BaseException) -> str:
    """The backend's message, first line, without gloo's source location and boilerplate."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    text = lines[0] if lines else type(error).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text)
    text = text.split(" This is typically caused by")[0].rstrip(". ")
    return text if len(text) <= 300 else text[:297] + "..."


def _ranks(peers: Sequence[int]) -> str:
    peers = sorted(set(peers))
    return f"rank {peers[0]}" if len(peers) == 1 else "ranks " + ", ".join(str(p) for p in peers)


_FIRST_LOSS_KEY = "lightning_gossip/first_lost_peer"
_STORE_TIMEOUT = timedelta(seconds=2)


def _first_loss(report: Optional[str]) -> Optional[str]:
    """Record ``report`` as this run's first lost peer unless one is recorded already; return the recorded one.

    Best effort: the store lives in one rank's process, which may be the one that died (then this gives up fast).
    """
    try:
        # This run is failing; never wait the process-group timeout here, and never for ever (a TCPStore client
        # retries a read that gets no answer without end when the store's host hangs).
        store = health.default_store().with_deadline(_STORE_TIMEOUT.total_seconds())  # the store's own errors
        if report is None:
            if not store.check([_FIRST_LOSS_KEY]):
                return None
            return store.get(_FIRST_LOSS_KEY).decode()
        return store.compare_set(_FIRST_LOSS_KEY, "", report).decode()
    except Exception:  # noqa: BLE001 - the store is only a courtesy; the error raised is what matters
        return None


def record_first_failure(report: str) -> None:
    """Record ``report`` as this run's first failure (if none is recorded), so the errors the other ranks raise when
    this rank stops quote the real cause instead of only "connection closed"."""
    _first_loss(report)


def _with_first_loss(text: str, mine: Optional[str]) -> str:
    first = _first_loss(mine)
    if first and first != mine:
        text += f" The first loss reported in this run: {first}."
    return text


_ADVICE = "This run cannot continue: restart it from the last checkpoint (Trainer.fit(ckpt_path=...))."


def peer_lost_error(rank: int, peers: Sequence[int], what: str, error: BaseException) -> GossipPeerError:
    """The error for a failed operation ``what`` of ``rank`` that waited for ``peers`` (and record it as lost).

    When the heartbeats show a hung rank (or a rank on this host whose process is gone), the error names that rank,
    even if this one was waiting for another (which is then alive, waiting itself): ``peers`` are the named ranks.
    """
    found = health.diagnose()
    culprits = found.culprits if found else []
    waited = sorted(set(peers))
    if culprits:
        named = [r for r in waited if r in culprits] or culprits
        who = _ranks(named)
        text = f"Rank {rank} lost gossip peer {who} during {what}: {health.explain(found)}."
        if named != waited:
            text += f" (The operation that failed was waiting for {_ranks(waited)}.)"
        text += f" The backend said: {_detail(error)}."
        peers = named
    else:
        who = _ranks(waited)
        text = (
            f"Rank {rank} lost gossip peer {who} during {what}: {_detail(error)}. The peer process most likely died "
            f"(killed, out of memory, crashed) or did not answer within the process-group timeout; see the log of "
            f"{who}."
        )
        if found is not None and found.store_unresponsive is not None:
            text += f" {health.explain(found)}."
    text = _with_first_loss(text, f"rank {rank} lost gossip peer {who} during {what}")
    health.report_failure(list(peers))
    return GossipPeerError(f"{text} {_ADVICE}", rank, peers)


def store_lost_error(what: str, error: BaseException) -> GossipPeerError:
    """The error for a call to the process group's store that failed or got no answer: its host (rank 0, or torchrun's
    agent) hangs or died, or the heartbeats name another rank that did."""
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else -1
    host = health.store_host_rank()
    found = health.diagnose()
    culprits = found.culprits if found else []
    if not culprits and host is not None and host != rank:
        culprits = [host]
    where = health.describe_store_host()
    if culprits:
        return peer_lost_error(rank, culprits, f"{what}, hosted by {where}", error)
    text = (f"Rank {rank}: {what} failed: {_detail(error)}. The store's host, {where}, hangs or died "
            f"(with torchrun, its agent: see the agent's log).")
    return GossipPeerError(f"{text} {_ADVICE}", rank, [])


def store() -> "health.DeadlineStore":
    """The default process group's store for gossip's own calls: bounded (a hung host raises instead of hanging for
    ever) and failing with a :class:`GossipPeerError` that names the rank lost."""
    return health.default_store(store_lost_error)


def raise_if_hang_declared(rank: int) -> None:
    """Raise the :class:`GossipPeerError` for a hung rank the watchdog has declared (cheap: no store call)."""
    monitor = health.current()
    found = monitor.declared() if monitor is not None else None
    if not found:
        return
    culprits = found.culprits
    text = (
        f"Rank {rank} lost gossip peer {_ranks(culprits) if culprits else 'the store host'} while training: "
        f"{monitor.explain(found)} (its heartbeat in the store stopped for the process-group timeout, "
        f"{monitor.timeout_s:.0f} s)."
    )
    health.report_failure(culprits)
    raise GossipPeerError(f"{text} {_ADVICE}", rank, culprits)


@contextmanager
def collective_guard(what: str, group: Optional[dist.ProcessGroup] = None) -> Iterator[None]:
    """Re-raise a failure of a collective over all ranks as a :class:`GossipPeerError`.

    A collective cannot tell which rank is gone; with two ranks it can only be the other one, otherwise the error
    lists the ranks that took part.
    """
    try:
        yield
    except GossipPeerError:
        raise
    except RuntimeError as error:
        if not (dist.is_available() and dist.is_initialized()):
            raise
        rank, world_size = dist.get_rank(group), dist.get_world_size(group)
        others = [r for r in range(world_size) if r != rank]
        found = health.diagnose()
        if found and found.culprits:
            raise peer_lost_error(dist.get_rank(), found.culprits, what, error) from error
        if len(others) == 1:
            raise peer_lost_error(rank, others, what, error) from error
        text = (
            f"Rank {rank}: {what} over all {world_size} ranks failed: {_detail(error)}. One of ranks "
            f"{', '.join(str(r) for r in others)} most likely died (killed, out of memory, crashed) or did not answer "
            "within the process-group timeout."
        )
        raise GossipPeerError(f"{_with_first_loss(text, None)} {_ADVICE}", rank, ()) from error
