"""Liveness of the ranks: a heartbeat per rank in the process group's store, and a watchdog that tells a hung rank
from a slow one, names it, and ends what cannot end by itself.

Why. A rank that dies closes its connections, and its peers learn of it at once. A rank that *hangs* (SIGSTOP, a
wedged driver, a swapping host, a stuck filesystem) closes nothing: its peers wait in gloo until the process-group
timeout and then see ``Timed out waiting 20000ms for recv`` without a rank, and whatever then asks the store hangs
for ever when the hung process is the one that hosts it (rank 0 under Lightning's launcher): a TCPStore client
retries a read that gets no answer without end, whatever timeout it was given. So:

* **Heartbeat.** Every process writes a counter to the store about once a second from a daemon thread, over a
  connection of its own (a clone of the default store's), and reads every other rank's. A rank whose counter has
  not moved for a while is frozen as a whole (all its threads stopped), which a merely slow rank never is: its
  heartbeat thread still runs. When the store's host is the hung process, the reads themselves get no answer, and
  that names the store's host.
* **Watchdog.** While training is in progress (:meth:`HealthMonitor.arm`), a second thread, which never touches the
  store, declares a rank hung when its heartbeat has not moved for the process-group timeout (or the store's host
  when no read has come back for that long). A declaration is printed, recorded for :func:`check` (the gossip step
  raises it as a :class:`~lightning_gossip.gossip.errors.GossipPeerError` naming the rank), and a hung process on
  this host is **killed with SIGKILL** (its identity checked: boot id, pid namespace, pid and start time), because
  a stopped process cannot end itself and, when it is rank 0 under Lightning's launcher, is the job's main process:
  without the kill the job would never end. If this process's own main thread is still running ``grace`` seconds
  after a declaration (stuck in a call that never returns), the watchdog ends it (exit code 1), saying why.
* **Naming.** :mod:`~lightning_gossip.gossip.errors` asks :func:`diagnose` whenever a collective or an exchange
  fails, so the error names the hung or dead rank (dead: its process on this host is gone) rather than the peer it
  happened to wait for, or nobody.
* **Store calls with a deadline.** :func:`default_store` wraps the default store so that a call that gets no
  answer within the store's timeout (plus a margin) raises :class:`StoreUnresponsiveError` naming the store's host
  instead of hanging; the gossip code's own store calls go through it.

Switch the kill off with ``LIGHTNING_GOSSIP_KILL_HUNG_PEERS=0`` (for instance while a debugger holds a rank stopped).
Plain torch.distributed: no Lightning import.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import socket
import sys
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

HEARTBEAT_INTERVAL_S = 1.0
_PREFIX = "lightning_gossip/health"
_DONE = "done"
_FAILED = "failed="


def _csv(ranks: list[int]) -> str:
    return ",".join(str(r) for r in ranks)
KILL_ENV = "LIGHTNING_GOSSIP_KILL_HUNG_PEERS"
# Extra time a store call may take beyond the store's own timeout before it counts as unanswered.
_STORE_MARGIN_S = 2.0


# -- store calls with a deadline -------------------------------------------------------------------------------------
class StoreUnresponsiveError(TimeoutError):
    """A call to the process group's key-value store got no answer: the process that hosts it hangs (or is gone)."""


def call_with_deadline(fn: Callable[[], T], seconds: float, what: str) -> T:
    """Run ``fn`` on a daemon thread and return its result, or raise :class:`StoreUnresponsiveError` after ``seconds``.

    The thread of a call that does not return is left behind (a daemon: it never keeps the interpreter alive).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            box["error"] = error

    thread = threading.Thread(target=run, name="lightning-gossip-store-call", daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        raise StoreUnresponsiveError(f"{what} got no answer within {seconds:.1f} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


class DeadlineStore:
    """A store whose calls raise :class:`StoreUnresponsiveError` instead of hanging when its host hangs.

    The deadline is the store's own timeout plus a margin (a ``get``/``wait`` of a missing key legitimately waits that
    long). After one call went unanswered the connection is stuck (the client serialises calls), so every later call
    fails at once with the same error.
    """

    def __init__(
        self,
        store: dist.Store,
        describe_host: Callable[[], str],
        on_failure: Optional[Callable[[str, BaseException], BaseException]] = None,
    ) -> None:
        self.store = store
        self._describe_host = describe_host
        # turns a failed call (what, error) into the exception raised (the gossip errors: a GossipPeerError)
        self._on_failure = on_failure or (lambda what, error: error)

    # Shared by every wrapper of one store: its connection is stuck behind the call that got no answer.
    _STUCK: dict[int, str] = {}

    @property
    def _stuck(self) -> Optional[str]:
        return DeadlineStore._STUCK.get(id(self.store))

    @_stuck.setter
    def _stuck(self, text: str) -> None:
        DeadlineStore._STUCK[id(self.store)] = text

    def _deadline(self) -> float:
        with suppress(Exception):
            return self.store.timeout.total_seconds() + _STORE_MARGIN_S
        return 300.0

    def _call(self, name: str, *args: Any, deadline: Optional[float] = None) -> Any:
        what = f"a call to the process group's store (store.{name})"
        if self._stuck is not None:
            raise self._on_failure(what, StoreUnresponsiveError(self._stuck))
        seconds = self._deadline() if deadline is None else deadline
        try:
            return call_with_deadline(lambda: getattr(self.store, name)(*args), seconds, f"store.{name}")
        except StoreUnresponsiveError:
            self._stuck = (
                f"the store did not answer within {seconds:.1f} s: its host, {self._describe_host()}, hangs or is "
                "unreachable"
            )
            monitor = current()
            if monitor is not None:
                monitor.note_store_unresponsive()
            error: BaseException = StoreUnresponsiveError(self._stuck)
        except (RuntimeError, OSError) as failed:  # DistNetworkError, DistStoreError: its host died, say
            if isinstance(failed, (KeyError, ValueError)):
                raise
            error = failed
        raise self._on_failure(what, error) from error

    def set(self, key: str, value: Any) -> None:
        self._call("set", key, value)

    def get(self, key: str) -> bytes:
        return self._call("get", key)

    def add(self, key: str, amount: int) -> int:
        return self._call("add", key, amount)

    def check(self, keys: list[str]) -> bool:
        return self._call("check", keys)

    def compare_set(self, key: str, expected: Any, desired: Any) -> bytes:
        return self._call("compare_set", key, expected, desired)

    def multi_get(self, keys: list[str]) -> list[bytes]:
        return self._call("multi_get", keys)

    def wait(self, keys: list[str], *rest: Any) -> None:
        self._call("wait", keys, *rest)

    def delete_key(self, key: str) -> bool:
        return self._call("delete_key", key)

    def with_deadline(self, seconds: float) -> "_Bounded":
        """The same store, every call bounded by ``seconds`` (for courtesy calls on a path that is failing)."""
        return _Bounded(self, seconds)

    @property
    def timeout(self) -> timedelta:
        return self.store.timeout

    def set_timeout(self, timeout: timedelta) -> None:
        self.store.set_timeout(timeout)


class _Bounded:
    def __init__(self, store: DeadlineStore, seconds: float) -> None:
        self._store, self._seconds = store, seconds

    def __getattr__(self, name: str) -> Callable[..., Any]:
        return lambda *args: self._store._call(name, *args, deadline=self._seconds)


_DEADLINE_STORES: dict[tuple[int, Any], DeadlineStore] = {}


def default_store(on_failure: Optional[Callable[[str, BaseException], BaseException]] = None) -> DeadlineStore:
    """The default process group's store, its calls bounded (see :class:`DeadlineStore`); ``on_failure`` turns a
    failed call into the exception raised (:func:`lightning_gossip.gossip.errors.store` passes the gossip errors')."""
    store = dist.distributed_c10d._get_default_store()
    key = (id(store), on_failure)
    wrapped = _DEADLINE_STORES.get(key)
    if wrapped is None or wrapped.store is not store:
        wrapped = _DEADLINE_STORES[key] = DeadlineStore(store, describe_store_host, on_failure)
    return wrapped


def store_host_rank() -> Optional[int]:
    """The rank whose process hosts the default store: 0 for a TCPStore from env:// or tcp:// rendezvous (Lightning's
    launchers, ``mp.spawn`` scripts); None when torchrun's agent hosts it (``TORCHELASTIC_USE_AGENT_STORE``) or the
    store is not a TCPStore (a FileStore has no host process)."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return None
    with suppress(Exception):
        store = dist.distributed_c10d._get_default_store()
        while isinstance(store, dist.PrefixStore):
            store = store.underlying_store
        if not isinstance(store, dist.TCPStore):
            return None
    return 0


def describe_store_host() -> str:
    rank = store_host_rank()
    if rank is None:
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            return "torchrun's elastic agent (MASTER_ADDR:MASTER_PORT)"
        return "its storage"
    monitor = current()
    return monitor.describe(rank) if monitor is not None else f"rank {rank}"


# -- who a rank is ----------------------------------------------------------------------------------------------------
def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str]:
    stat = _read(f"/proc/{pid}/stat")
    return stat[stat.rfind(")") + 2 :].split() if stat else []


_STATES = {
    "T": "stopped by SIGSTOP or job control",
    "t": "stopped by a debugger or tracer",
    "D": "in uninterruptible sleep: a stuck filesystem or driver",
    "Z": "a zombie: dead, not yet reaped",
    "R": "running",
    "S": "sleeping",
}


@dataclass(frozen=True)
class ProcessIdentity:
    """A process, told apart from any other on any host: host name, boot id and pid namespace (which host and
    container), pid and start time (the pid is not a reused one)."""

    host: str
    boot_id: str
    pid_namespace: str
    pid: int
    start_ticks: str

    @classmethod
    def of_this_process(cls) -> "ProcessIdentity":
        fields = _stat_fields(os.getpid())
        namespace = ""
        with suppress(OSError):
            namespace = os.readlink("/proc/self/ns/pid")
        return cls(
            host=socket.gethostname(),
            boot_id=_read("/proc/sys/kernel/random/boot_id"),
            pid_namespace=namespace,
            pid=os.getpid(),
            start_ticks=fields[19] if len(fields) > 19 else "",
        )

    def on_this_host(self) -> bool:
        mine = _this_process()
        return bool(self.boot_id) and (self.host, self.boot_id, self.pid_namespace) == (
            mine.host, mine.boot_id, mine.pid_namespace)

    def state(self) -> Optional[str]:
        """The process's state letter (``/proc/<pid>/stat``) if it is this process on this host; None if it is gone
        or cannot be seen from here."""
        if not self.on_this_host():
            return None
        fields = _stat_fields(self.pid)
        if len(fields) <= 19 or fields[19] != self.start_ticks:
            return "gone"
        return fields[0]

    def gone(self) -> bool:
        """Whether this process is seen (on this host) to have exited."""
        return self.state() in ("gone", "Z")

    def kill(self) -> bool:
        """SIGKILL the process if it is this very process on this host (never a reused pid). True if sent."""
        state = self.state()
        if state is None or state in ("gone", "Z") or self.pid == os.getpid():
            return False
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host}"


_THIS: Optional[ProcessIdentity] = None


def _this_process() -> ProcessIdentity:
    global _THIS
    if _THIS is None or _THIS.pid != os.getpid():  # a forked child is another process
        _THIS = ProcessIdentity.of_this_process()
    return _THIS


# -- the monitor ------------------------------------------------------------------------------------------------------
@dataclass
class Diagnosis:
    """What the heartbeats say now: ranks frozen for at least ``stale_s`` (``hung``), ranks whose process on this host
    is gone (``dead``), and whether the store's host does not answer (``store_unresponsive``)."""

    hung: dict[int, float] = field(default_factory=dict)  # rank -> seconds without a heartbeat
    dead: list[int] = field(default_factory=list)
    store_unresponsive: Optional[float] = None  # seconds without an answer from the store
    killed: list[int] = field(default_factory=list)
    silent: dict[int, float] = field(default_factory=dict)  # dead rank -> seconds without a heartbeat (it hung first)
    # ranks named by another rank whose error came first (when this rank sees no culprit itself): culprit -> reporter
    reported: dict[int, int] = field(default_factory=dict)

    @property
    def culprits(self) -> list[int]:
        return sorted(set(self.hung) | set(self.dead) | set(self.reported))

    def __bool__(self) -> bool:
        return bool(self.hung or self.dead or self.reported or self.store_unresponsive is not None)


class HealthMonitor:
    """The heartbeat and watchdog of one process (see the module's docstring). Start it with :func:`start`."""

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        timeout_s: float,
        interval_s: float = HEARTBEAT_INTERVAL_S,
        kill_hung_local_peers: bool = True,
        grace_s: float = 10.0,
        exit_on_declaration: bool = True,
    ) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self.interval_s = float(interval_s)
        self.kill_hung_local_peers = kill_hung_local_peers
        self.grace_s = float(grace_s)
        self.exit_on_declaration = exit_on_declaration
        self.identities: dict[int, ProcessIdentity] = {}
        self._lock = threading.Lock()
        self._beats: dict[int, str] = {}
        self._changed: dict[int, float] = {}
        self._retired: set[int] = set()
        self._reports: dict[int, list[int]] = {}  # rank -> the ranks its GossipPeerError named
        self._failed_with: Optional[list[int]] = None
        self._last_answer = time.monotonic()
        self._asking_since: Optional[float] = None
        self._store_stuck_at: Optional[float] = None
        self._armed = False
        self._declared: Optional[Diagnosis] = None
        self._declared_at: Optional[float] = None
        self._announced: set[Any] = set()
        self._stopped = threading.Event()
        self._counter = 0
        self._threads: list[threading.Thread] = []

    # keys
    def _key(self, kind: str, rank: int) -> str:
        return f"{_PREFIX}/{kind}/{rank}"

    # -- life cycle -------------------------------------------------------------------------------------------------
    def start(self) -> None:
        me = _this_process()
        self.identities[self.rank] = me
        self.store.set(self._key("identity", self.rank), json.dumps(asdict(me)))
        self.store.set(self._key("beat", self.rank), "0")
        self._learn_identities(min(self.timeout_s, 30.0))
        now = time.monotonic()
        self._last_answer = now
        for name, target in (("heartbeat", self._heartbeat_loop), ("watchdog", self._watchdog_loop)):
            thread = threading.Thread(target=target, name=f"lightning-gossip-{name}-rank{self.rank}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _learn_identities(self, wait_s: float) -> None:
        """Wait (at most ``wait_s``) for the other ranks' identities: every rank starts its monitor at the same point,
        and a rank that hangs before this one's first heartbeat read could otherwise be named without pid and host,
        and not be killed by a rank on its host. Best effort: the heartbeat loop picks up identities that come later."""
        others = [r for r in range(self.world_size) if r != self.rank]
        keys = [self._key("identity", r) for r in others]

        def fetch() -> None:
            with suppress(Exception):  # a rank that never starts its monitor: read the ones that did
                self.store.wait(keys, timedelta(seconds=wait_s))
            present = [r for r in others if self.store.check([self._key("identity", r)])]
            values = self.store.multi_get([self._key("identity", r) for r in present]) if present else []
            for r, value in zip(present, values):
                self.identities[r] = ProcessIdentity(**json.loads(value))

        with suppress(Exception):  # bounded: the store's host may hang already
            call_with_deadline(fetch, wait_s + 3.0, "the other ranks' identities")

    def stop(self) -> None:
        self._stopped.set()

    def retire(self) -> None:
        """This process is ending: peers stop watching it (best effort, half a second at most: the connection may be
        held by a heartbeat read that waits for a hung store host)."""
        self.disarm()
        final = _DONE if self._failed_with is None else f"{_FAILED}{_csv(self._failed_with)}"
        self._write_beat(final)
        self.stop()

    def report_failure(self, culprits: list[int]) -> None:
        """This rank raised a GossipPeerError naming ``culprits``: its heartbeat says so from now on, so that the
        others, whose own view may come too late, name the same ranks (and do not take this rank, which may exit at
        once, for a culprit)."""
        if self._failed_with is None and culprits:
            self._failed_with = sorted(set(culprits))
            self._write_beat(self._beat_value())

    def _beat_value(self) -> str:
        value = str(self._counter)
        return value if self._failed_with is None else f"{value};{_FAILED}{_csv(self._failed_with)}"

    def _write_beat(self, value: str) -> None:
        with suppress(Exception):
            call_with_deadline(lambda: self.store.set(self._key("beat", self.rank), value), 0.5, "heartbeat")

    def arm(self) -> None:
        """Training is in progress: hung ranks are declared (and acted on) from now on."""
        with self._lock:
            self._armed = True
            self._declared = None
            self._declared_at = None

    def disarm(self) -> None:
        """Training ended normally: declare nothing (peers may exit at any moment now)."""
        with self._lock:
            self._armed = False

    @property
    def armed(self) -> bool:
        return self._armed

    # -- the heartbeat thread (the only one that waits for the store) -------------------------------------------------
    def _heartbeat_loop(self) -> None:
        others = [r for r in range(self.world_size) if r != self.rank]
        try:
            while not self._stopped.is_set():
                self._counter += 1
                self.store.set(self._key("beat", self.rank), self._beat_value())
                missing = [r for r in others if r not in self.identities]
                self._asking_since = time.monotonic()
                if missing:
                    present = [r for r in missing if self.store.check([self._key("identity", r)])]
                    if present:
                        values = self.store.multi_get([self._key("identity", r) for r in present])
                        for r, value in zip(present, values):
                            self.identities[r] = ProcessIdentity(**json.loads(value))
                known = [r for r in others if r in self.identities]
                values = self.store.multi_get([self._key("beat", r) for r in known]) if known else []
                now = time.monotonic()
                with self._lock:
                    self._asking_since = None
                    self._last_answer = now
                    for r, value in zip(known, values):
                        text = value.decode()
                        if text == _DONE:
                            self._retired.add(r)
                        if _FAILED in text:
                            self._reports[r] = [int(x) for x in text.split(_FAILED, 1)[1].split(",") if x]
                        if self._beats.get(r) != text:
                            self._beats[r] = text
                            self._changed[r] = now
                self._stopped.wait(self.interval_s)
        except Exception:  # noqa: BLE001 - the store is gone (its host exited or died): nothing more to watch
            with self._lock:
                self._asking_since = None
                self._store_gone = True

    _store_gone = False

    def reread_beats(self, ranks: list[int], seconds: float = 1.0) -> None:
        """Read the last heartbeats of ``ranks`` now, on the default store (at most ``seconds``): a rank that raised
        an error, wrote so in its beat and exited at once may be gone before this rank's heartbeat thread read it,
        and must not be taken for a culprit."""
        keys = [self._key("beat", r) for r in ranks]
        with suppress(Exception):
            store = dist.distributed_c10d._get_default_store()
            values = call_with_deadline(lambda: store.multi_get(keys), seconds, "the heartbeats")
            with self._lock:
                for r, value in zip(ranks, values):
                    text = value.decode()
                    if text == _DONE:
                        self._retired.add(r)
                    if _FAILED in text:
                        self._reports[r] = [int(x) for x in text.split(_FAILED, 1)[1].split(",") if x]

    def note_store_unresponsive(self) -> None:
        """A bounded store call of the main thread went unanswered (see :class:`DeadlineStore`)."""
        with self._lock:
            if self._store_stuck_at is None:
                self._store_stuck_at = time.monotonic()

    # -- what the heartbeats say ----------------------------------------------------------------------------------------
    def diagnose(self, stale_s: Optional[float] = None) -> Diagnosis:
        """Ranks whose heartbeat has not moved for ``stale_s`` seconds (default: a quarter of the timeout, at least
        3 heartbeats and 3 s, at most 60 s), dead ranks on this host, and whether the store does not answer."""
        if stale_s is None:
            stale_s = min(60.0, max(3.0, 3 * self.interval_s, self.timeout_s / 4))
        now = time.monotonic()
        found = Diagnosis()
        with self._lock:
            waiting = now - self._asking_since if self._asking_since is not None else 0.0
            if self._store_stuck_at is not None:
                waiting = max(waiting, now - self._store_stuck_at)
            answered_recently = waiting < stale_s and not self._store_gone
            reports = dict(self._reports)
            for r in range(self.world_size):
                if r == self.rank or r in self._retired or r in reports:
                    continue  # a rank that reported a failure is a consequence, whether it still runs or not
                identity = self.identities.get(r)
                if identity is not None and identity.gone():
                    found.dead.append(r)
                    quiet = now - self._changed[r] if r in self._changed else 0.0
                    if r == store_host_rank():
                        quiet = max(quiet, waiting)
                    if quiet >= stale_s:
                        found.silent[r] = quiet  # it hung before it died (killed by a watchdog, say)
                    continue
                # Judged on the answers this rank got: frozen for stale_s in what the store last said (a read that
                # is still waiting for its answer says nothing about the others).
                if answered_recently and r in self._changed and self._last_answer - self._changed[r] >= stale_s:
                    found.hung[r] = now - self._changed[r]
        if waiting >= stale_s:
            found.store_unresponsive = waiting
            host = store_host_rank()
            if host is not None and host != self.rank and host not in found.dead and host not in self._retired:
                found.hung.setdefault(host, waiting)
        if not found.hung and not found.dead:
            for reporter, named in sorted(reports.items()):
                for r in named:
                    if r != self.rank and r not in reports:
                        found.reported.setdefault(r, reporter)
        return found

    def describe(self, rank: int, state: bool = True) -> str:
        """``rank 2 (pid 123 on host h)``, with the process's state when it is on this host and telling (stopped, in
        uninterruptible sleep)."""
        identity = self.identities.get(rank)
        if identity is None:
            return f"rank {rank}"
        text = f"rank {rank} ({identity.describe()}"
        letter = identity.state() if state else None
        if letter is not None and letter in _STATES and letter not in ("R", "S", "Z"):
            text += f"; {_STATES[letter]}"
        return text + ")"

    def explain(self, found: Diagnosis) -> str:
        """One sentence per culprit, for an error message."""
        parts = []
        for r in sorted(found.hung):
            why = f"no heartbeat for {found.hung[r]:.0f} s"
            if found.store_unresponsive is not None and r == store_host_rank():
                why = f"it hosts the process group's store, which has not answered for {found.store_unresponsive:.0f} s"
            killed = "; this rank killed it so the run can end" if r in found.killed else ""
            parts.append(f"{self.describe(r)} hangs ({why}{killed})")
        for r in found.dead:
            if r in found.silent:
                parts.append(f"{self.describe(r)} hung (no sign of life for {found.silent[r]:.0f} s) and is gone now "
                             "(killed by a watchdog, or it exited)")
            else:
                parts.append(f"{self.describe(r)} is gone (its process exited or was killed)")
        for r, reporter in sorted(found.reported.items()):
            parts.append(f"{self.describe(r)} was lost (rank {reporter}, whose error came first, named it)")
        if found.store_unresponsive is not None and store_host_rank() is None:
            parts.append(f"the process group's store ({describe_store_host()}) has not answered for "
                         f"{found.store_unresponsive:.0f} s")
        return "; ".join(parts)

    def act_on(self, found: Diagnosis) -> Diagnosis:
        """Kill the hung ranks whose processes run on this host (so a stopped process cannot keep the job alive)."""
        if not (self.kill_hung_local_peers and os.environ.get(KILL_ENV, "1") != "0"):
            return found
        for r in sorted(found.hung):
            identity = self.identities.get(r)
            who = self.describe(r)
            if identity is not None and identity.kill():
                found.killed.append(r)
                self._say(("killed", r), f"lightning_gossip: rank {self.rank} killed {who} with SIGKILL: it hung "
                          f"({self._why(found, r)}) and a stopped process cannot end by itself.")
        return found

    def _why(self, found: Diagnosis, r: int) -> str:
        if found.store_unresponsive is not None and r == store_host_rank():
            return f"the store it hosts has not answered for {found.store_unresponsive:.0f} s"
        return f"no heartbeat for {found.hung.get(r, 0.0):.0f} s"

    # -- the watchdog thread (never touches the store) -----------------------------------------------------------------
    def _watchdog_loop(self) -> None:
        while not self._stopped.wait(min(0.5, self.interval_s)):
            if not self.armed:
                continue
            if self._declared is None:
                found = self.diagnose(stale_s=self.timeout_s)
                # Only hangs are ours to declare (a dead peer is reported by the connection it closed); the dead are
                # named too, since a hung rank killed by another rank's watchdog is dead by the time this one looks.
                if not found.hung and found.store_unresponsive is None:
                    continue
                # A rank that died without hanging first is a consequence (it raised its own error and exited before
                # this rank read its last beat), not a culprit of this declaration.
                found.dead = [r for r in found.dead if r in found.silent]
                self.act_on(found)
                with self._lock:
                    self._declared, self._declared_at = found, time.monotonic()
                self._say(("declared",), f"lightning_gossip: rank {self.rank}: {self.explain(found)}; this run "
                          "cannot continue.")
            elif self.exit_on_declaration and time.monotonic() - (self._declared_at or 0.0) > self.grace_s:
                self._end_this_process()
                return

    def declared(self) -> Optional[Diagnosis]:
        """What the watchdog declared (while armed), or None."""
        return self._declared

    def _end_this_process(self) -> None:
        """The main thread did not end within the grace period after a declaration: it is stuck in a call that will
        never return (a store call to a hung host, say). End the process, with its stack for the record."""
        self._say(("exit",), f"lightning_gossip: rank {self.rank}: still running {self.grace_s:.0f} s after a hung "
                  f"rank was declared ({self.explain(self._declared or Diagnosis())}); the main thread is stuck "
                  "(stack below). Ending this process with exit code 1 so the run ends.")
        with suppress(Exception):
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        with suppress(Exception):
            sys.stderr.flush()
            sys.stdout.flush()
        os._exit(1)

    def _say(self, key: Any, text: str) -> None:
        if key in self._announced:
            return
        self._announced.add(key)
        with suppress(Exception):
            sys.stderr.write(text + "\n")
            sys.stderr.flush()


# -- the process-wide monitor -------------------------------------------------------------------------------------------
_MONITOR: Optional[HealthMonitor] = None
_MONITOR_GROUP: Optional[int] = None
_START_LOCK = threading.Lock()


def process_group_timeout(group: Optional[dist.ProcessGroup] = None) -> float:
    """The timeout (seconds) the default group was created with; torch's default (30 min) if unknown."""
    group = group if group is not None else dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        with suppress(Exception):
            return group._get_backend(torch.device(device)).options._timeout.total_seconds()
    return 1800.0


def _own_connection(store: Any) -> Any:
    """A connection to the store of its own (the heartbeat waits on it without holding up the training thread's
    calls); the store itself where it cannot be cloned (torch < 2.6, or a store that is not a TCPStore)."""
    with suppress(Exception):
        clone = store.clone()
        if clone is not None:
            return clone
    return store


def start(timeout_s: Optional[float] = None, **options: Any) -> Optional[HealthMonitor]:
    """The heartbeat and watchdog of this process for the default process group (started once per group; later
    calls return the running one). None without a process group or with one rank."""
    global _MONITOR, _MONITOR_GROUP
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    group = dist.distributed_c10d._get_default_group()
    with _START_LOCK:
        if _MONITOR is not None and _MONITOR_GROUP == id(group) and not _MONITOR._stopped.is_set():
            return _MONITOR
        if _MONITOR is not None:
            _MONITOR.stop()
        store = _own_connection(dist.distributed_c10d._get_default_store())
        monitor = HealthMonitor(
            store, dist.get_rank(), dist.get_world_size(),
            timeout_s if timeout_s is not None else process_group_timeout(group), **options,
        )
        monitor.start()
        _MONITOR, _MONITOR_GROUP = monitor, id(group)
        _register_exit_hooks()
        return monitor


def current() -> Optional[HealthMonitor]:
    """The running monitor of this process, if any."""
    monitor = _MONITOR
    if monitor is None or monitor._stopped.is_set() or _MONITOR_GROUP is None:
        return None
    if not (dist.is_available() and dist.is_initialized()):
        return None
    with suppress(Exception):
        if id(dist.distributed_c10d._get_default_group()) != _MONITOR_GROUP:
            return None
    return monitor


def diagnose(stale_s: Optional[float] = None, act: bool = True, settle_s: float = 1.0) -> Optional[Diagnosis]:
    """What the heartbeats say now (None without a monitor). ``act``: kill the hung ranks on this host (a failing
    collective or exchange asks: the run is over, and a stopped process cannot end by itself). ``settle_s``: with no
    culprit yet, look again for that long: a killed peer's connections close a moment before its process is seen
    to be gone."""
    monitor = current()
    if monitor is None:
        return None
    deadline = time.monotonic() + settle_s
    found = monitor.diagnose(stale_s)
    if found.dead:
        monitor.reread_beats(found.dead)
        found = monitor.diagnose(stale_s)
    while not found.culprits and time.monotonic() < deadline:
        time.sleep(0.05)
        found = monitor.diagnose(stale_s)
    return monitor.act_on(found) if act and found.hung else found


def report_failure(culprits: list[int]) -> None:
    """This rank is failing with an error that names ``culprits`` (see :meth:`HealthMonitor.report_failure`)."""
    monitor = current()
    if monitor is not None:
        monitor.report_failure(culprits)


def explain(found: Diagnosis) -> str:
    monitor = current()
    return monitor.explain(found) if monitor is not None else ""


def describe(rank: int) -> str:
    monitor = current()
    return monitor.describe(rank) if monitor is not None else f"rank {rank}"


def arm() -> None:
    monitor = current()
    if monitor is not None:
        monitor.arm()


def disarm() -> None:
    monitor = current()
    if monitor is not None:
        monitor.disarm()


_EXIT_HOOKS = False


def _register_exit_hooks() -> None:
    global _EXIT_HOOKS
    if _EXIT_HOOKS:
        return
    _EXIT_HOOKS = True
    import atexit

    def at_exit() -> None:
        monitor = _MONITOR
        if monitor is None:
            return
        # A failing run may leave a hung peer on this host that nothing else will end: kill it before going.
        with suppress(Exception):
            if monitor.armed or monitor.declared() is not None:
                monitor.act_on(monitor.diagnose())
        monitor.retire()

    atexit.register(at_exit)
