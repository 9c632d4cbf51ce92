"""A real bandwidth-limited network on one machine: one Linux network namespace per worker, veth pairs, a bridge.

    root namespace:  bridge lgb<tag> (10.213.S.1/24)
                       |-- veth lgh<tag><r>  ==  eth0 in namespace lgbench-<tag>-<r> (10.213.S.(10+r)/24)
    tc:  tbf on both ends of every veth, so each worker's link is rate-limited in both directions (its NIC).

Worker r runs as ``ip netns exec lgbench-<tag>-<r> python ...`` with ``GLOO_SOCKET_IFNAME=eth0`` and
``MASTER_ADDR`` = rank 0's address on the bridge. Everything is named with a random per-run tag, so two harnesses on
one machine do not collide, and :meth:`Network.close` deletes exactly what this object created (also on error and
Ctrl-C: use it as a context manager). Needs root (CAP_NET_ADMIN) and iproute2 (``ip``, ``tc``); :func:`probe`
says whether they are there, so the harness can fall back to loopback.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from typing import Optional

PREFIX = "lgbench"


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


def probe() -> tuple[bool, str]:
    """Whether this process can build namespaces, veths, a bridge and tc qdiscs; and why not, if not."""
    if sys.platform != "linux":
        return False, f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return False, "not running as root (network namespaces, veth, bridge and tc need CAP_NET_ADMIN)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` not found (install iproute2: apt-get install -y iproute2)"
    tag = secrets.token_hex(2)
    ns, br, veth = f"{PREFIX}-probe-{tag}", f"lgbp{tag}", f"lgpv{tag}"
    try:
        _run(["ip", "netns", "add", ns])
        _run(["ip", "link", "add", br, "type", "bridge"])
        _run(["ip", "link", "add", veth, "type", "veth", "peer", "name", veth + "p"])
        _run(["ip", "link", "set", veth + "p", "netns", ns])
        _run(["tc", "qdisc", "add", "dev", veth, "root", "tbf", "rate", "100mbit", "burst", "64kb", "latency", "50ms"])
        return True, "ok"
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        return False, f"could not build a test namespace/veth/bridge/tc qdisc: {error}"
    finally:
        _run(["ip", "link", "del", veth], check=False)
        _run(["ip", "link", "del", br], check=False)
        _run(["ip", "netns", "del", ns], check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    """A 10.213.S.0/24 that no interface or route on this machine uses."""
    used = _run(["ip", "-4", "addr"], check=False).stdout + _run(["ip", "-4", "route"], check=False).stdout
    for _ in range(200):
        net = ipaddress.IPv4Network(f"10.213.{secrets.randbelow(250) + 1}.0/24")
        if f"10.213.{net.network_address.packed[2]}." not in used:
            return net
    raise RuntimeError("no free 10.213.x.0/24 subnet found")


def tbf_args(rate_mbit: float) -> list[str]:
    # Burst: 5 ms of traffic, at least 64 KiB, so a GSO super-packet always fits; queue: 50 ms.
    burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 * 0.005))
    return ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "50ms"]


class Network:
    """``world_size`` namespaces on one bridge, links limited to ``rate_mbit`` (None: no limit)."""

    IFNAME = "eth0"

    def __init__(self, world_size: int, rate_mbit: Optional[float]) -> None:
        self.world_size = world_size
        self.rate_mbit = rate_mbit
        self.tag = secrets.token_hex(2)
        self.bridge = f"lgb{self.tag}"
        self.namespaces: list[str] = []
        self.host_veths: list[str] = []
        self.addresses: list[str] = []
        self.subnet: Optional[ipaddress.IPv4Network] = None
        self._bridge_made = False

    # -- build / tear down ----------------------------------------------------------------------------------------
    def __enter__(self) -> "Network":
        try:
            self.build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def build(self) -> None:
        self.subnet = _free_subnet()
        hosts = list(self.subnet.hosts())
        _run(["ip", "link", "add", self.bridge, "type", "bridge"])
        self._bridge_made = True
        _run(["ip", "addr", "add", f"{hosts[0]}/24", "dev", self.bridge])
        _run(["ip", "link", "set", self.bridge, "up"])
        for rank in range(self.world_size):
            ns = f"{PREFIX}-{self.tag}-{rank}"
            host, peer = f"lgh{self.tag}{rank}", f"lgp{self.tag}{rank}"
            address = str(hosts[9 + rank])
            _run(["ip", "netns", "add", ns])
            self.namespaces.append(ns)
            _run(["ip", "link", "add", host, "type", "veth", "peer", "name", peer])
            self.host_veths.append(host)
            _run(["ip", "link", "set", peer, "netns", ns])
            _run(["ip", "-n", ns, "link", "set", peer, "name", self.IFNAME])
            _run(["ip", "-n", ns, "addr", "add", f"{address}/24", "dev", self.IFNAME])
            _run(["ip", "-n", ns, "link", "set", self.IFNAME, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "link", "set", host, "master", self.bridge])
            _run(["ip", "link", "set", host, "up"])
            if self.rate_mbit:
                _run(["tc", "qdisc", "add", "dev", host, "root", *tbf_args(self.rate_mbit)])  # into the worker
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", self.IFNAME, "root",
                      *tbf_args(self.rate_mbit)])  # out of the worker
            self.addresses.append(address)

    def close(self) -> list[str]:
        """Delete every namespace, veth and the bridge this object made; returns what could not be deleted."""
        problems = []
        for host in self.host_veths:
            r = _run(["ip", "link", "del", host], check=False)
            if r.returncode != 0 and "Cannot find device" not in r.stderr:
                problems.append(f"veth {host}: {r.stderr.strip()}")
        for ns in self.namespaces:
            r = _run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                problems.append(f"netns {ns}: {r.stderr.strip()}")
        if self._bridge_made:
            r = _run(["ip", "link", "del", self.bridge], check=False)
            if r.returncode != 0 and "Cannot find device" not in r.stderr:
                problems.append(f"bridge {self.bridge}: {r.stderr.strip()}")
        self.host_veths, self.namespaces, self._bridge_made = [], [], False
        if problems:
            print("[benchmark] WARNING: could not remove: " + "; ".join(problems), file=sys.stderr)
        return problems

    # -- use ------------------------------------------------------------------------------------------------------
    @property
    def master_addr(self) -> str:
        return self.addresses[0]

    def wrap(self, rank: int, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[rank], *cmd]

    def describe(self) -> dict:
        return {
            "kind": "netns",
            "rate_mbit": self.rate_mbit,
            "subnet": str(self.subnet),
            "qdisc": " ".join(tbf_args(self.rate_mbit)) if self.rate_mbit else None,
        }

    def measure_mbit(self, seconds: float = 1.0) -> Optional[float]:
        """Throughput of one TCP stream from worker 1's namespace to worker 0's, as a check of the tc limit."""
        if self.world_size < 2:
            return None
        port = 29400 + secrets.randbelow(500)
        server = (
            "import socket,time\n"
            f"s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('{self.addresses[0]}',"
            f"{port}));s.listen(1);print('up',flush=True);c,_=s.accept();n=0;t=None\n"
            "while True:\n b=c.recv(1<<20)\n if not b: break\n"
            " if t is None: t=time.perf_counter()\n n+=len(b)\n"
            "print(n*8/(time.perf_counter()-t)/1e6)\n"
        )
        client = (
            "import socket,time\n"
            f"c=socket.create_connection(('{self.addresses[0]}',{port}));d=b'x'*(1<<18);t=time.perf_counter()\n"
            f"while time.perf_counter()-t<{seconds}: c.sendall(d)\n"
            "c.close()\n"
        )
        srv = subprocess.Popen(self.wrap(0, [sys.executable, "-c", server]), stdout=subprocess.PIPE, text=True)
        try:
            assert srv.stdout is not None
            srv.stdout.readline()
            subprocess.run(self.wrap(1, [sys.executable, "-c", client]), timeout=seconds + 20, check=True)
            out, _ = srv.communicate(timeout=20)
            return round(float(out.strip().splitlines()[-1]), 1)
        except (subprocess.SubprocessError, ValueError, IndexError, OSError):
            return None
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()


class Loopback:
    """Every worker on 127.0.0.1 (no rate limit): the fallback, and the "fast network" setting."""

    rate_mbit = None
    IFNAME = "lo"

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def close(self) -> list[str]:
        return []

    @property
    def master_addr(self) -> str:
        return "127.0.0.1"

    def wrap(self, rank: int, cmd: list[str]) -> list[str]:
        return cmd

    def describe(self) -> dict:
        return {"kind": "loopback", "rate_mbit": None}

    def measure_mbit(self, seconds: float = 1.0) -> Optional[float]:
        return None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_gone(names: list[str], timeout: float = 5.0) -> None:
    """Namespace deletion frees veths asynchronously; wait a moment so the next scenario starts clean."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        links = _run(["ip", "-o", "link"], check=False).stdout
        if not any(n in links for n in names):
            return
        time.sleep(0.1)
