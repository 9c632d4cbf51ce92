"""Start the workers of a run that may lose some of them and go on (``on_peer_loss="continue"``), on one machine.

    python -m lightning_gossip.gossip.launch --nproc 4 train.py --epochs 3
    lightning-gossip-launch --nproc 4 train.py --epochs 3

Why a launcher of its own: surviving a lost peer needs the survivors left running and a process group store that
outlives every worker. torchrun's agent hosts the store but ends every worker when one dies (and restarts them all
with ``--max-restarts``); Lightning's and Fabric's launchers end every process when a child fails, and rank 0 hosts
the store there, so rank 0 could never be lost. This launcher:

- hosts the ``TCPStore`` itself and tells the workers to connect to it as clients (``TORCHELASTIC_USE_AGENT_STORE``,
  torch's own switch for a store hosted by an agent), so any worker may die;
- starts ``--nproc`` copies of the command with the variables of torch's ``env://`` rendezvous and of Lightning's
  environment (``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
  ``NODE_RANK``): a plain torch script calls ``init_process_group("gloo")``, a Fabric script uses
  ``Fabric(devices=N)`` and Fabric sees that the processes were created for it;
- says on stderr, within a fraction of a second, which worker died and how, and leaves the others running;
- passes SIGINT and SIGTERM on to every worker and kills those still running ``--kill-after`` seconds later, so a
  signal ends the run within a bounded time; if the launcher itself dies, the kernel kills the workers (Linux).

Exit status: 0 when every worker that ended by itself ended with 0 (the survivors finished); the first other status
of such a worker otherwise; 1 when no worker ended by itself (all were lost); 128 + the signal after a SIGINT/SIGTERM.

Plain Python and torch.distributed (no Lightning import). One machine: a multi-node run needs a store host that
every node reaches and outlives every node (the same idea; not provided here).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from typing import Callable, Optional, Sequence

import torch.distributed as dist

#: How often the launcher looks at its workers.
POLL_SECONDS = 0.05


#: Variables of other launchers and schedulers that Lightning's environment detection would prefer to ours (under
#: sbatch, SLURM_NTASKS would make every worker a world of one): the workers do not inherit them.
_FOREIGN_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "LSB_", "TORCHELASTIC_", "GROUP_WORLD_SIZE", "ROLE_")


def _die_with_parent(parent: int) -> Callable[[], None]:
    def arm() -> None:  # pragma: no cover - runs in the child between fork and exec
        """Linux: the worker gets SIGKILL when the launcher dies, so a killed launcher leaves no worker behind."""
        try:
            ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (AttributeError, OSError):
            return
        if os.getppid() != parent:  # the launcher died before the request took effect
            os._exit(1)

    return arm


def _signal_worker(worker: subprocess.Popen, signum: int) -> None:
    """``signum`` to the worker's whole process group (it leads one: its own children, data loader workers, too)."""
    try:
        os.killpg(worker.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def worker_environment(rank: int, nproc: int, host: str, port: int) -> dict[str, str]:
    """The variables one worker gets (beside the launcher's environment, less other launchers' variables)."""
    return {
        "MASTER_ADDR": host,
        "MASTER_PORT": str(port),
        "WORLD_SIZE": str(nproc),
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "LOCAL_WORLD_SIZE": str(nproc),
        "NODE_RANK": "0",
        "GROUP_RANK": "0",
        # torch's env:// rendezvous then makes every rank a client of the store hosted here (rendezvous.py)
        "TORCHELASTIC_USE_AGENT_STORE": "True",
        "TORCHELASTIC_RESTART_COUNT": "0",
    }


def describe_exit(code: int) -> str:
    """A process's exit: ``exit code N`` or ``killed by SIGNAME`` (a negative code is the signal's number)."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def run(command: Sequence[str], nproc: int, host: str = "127.0.0.1", port: Optional[int] = None,
        store_timeout: float = 1800.0, kill_after: float = 30.0) -> int:
    """Start ``nproc`` workers running ``command``, wait for all, and return the exit status (module docstring)."""
    if nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if kill_after <= 0:
        raise ValueError(f"--kill-after must be a positive number of seconds, got {kill_after}")
    if not command:
        raise ValueError("no command to run: give the script (and its arguments) after the options")
    # The store lives here, outside every worker, for the whole run (port 0: the system picks a free one).
    store = dist.TCPStore(host, port or 0, nproc, True, wait_for_workers=False,
                          timeout=timedelta(seconds=store_timeout))
    port = store.port
    inherited = {key: value for key, value in os.environ.items() if not key.startswith(_FOREIGN_PREFIXES)}
    arm = _die_with_parent(os.getpid()) if sys.platform.startswith("linux") else None
    workers: list[subprocess.Popen] = []
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        for worker in workers:
            if worker.poll() is None:
                _signal_worker(worker, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    codes: dict[int, int] = {}
    try:
        for rank in range(nproc):
            env = {**inherited, **worker_environment(rank, nproc, host, port)}
            workers.append(subprocess.Popen(list(command), env=env, start_new_session=True, preexec_fn=arm))
        while len(codes) < nproc:
            for rank, worker in enumerate(workers):
                code = worker.poll()
                if code is None or rank in codes:
                    continue
                codes[rank] = code
                if code != 0:
                    alive = [r for r in range(nproc) if r not in codes]
                    print(f"[lightning-gossip-launch] worker rank {rank} (pid {worker.pid}) ended: "
                          f"{describe_exit(code)}; still running: ranks {alive}", file=sys.stderr, flush=True)
            if received and len(codes) < nproc:
                deadline = time.monotonic() + kill_after
                while time.monotonic() < deadline and any(w.poll() is None for w in workers):
                    time.sleep(POLL_SECONDS)
                for worker in workers:
                    if worker.poll() is None:
                        _signal_worker(worker, signal.SIGKILL)
                for rank, worker in enumerate(workers):
                    codes.setdefault(rank, worker.wait())
                break
            time.sleep(POLL_SECONDS)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for worker in workers:  # whatever is left of the workers' process groups (their children included)
            _signal_worker(worker, signal.SIGKILL)
            worker.wait()
        del store
    if received:
        return 128 + received[0]
    finished = [codes[r] for r in range(nproc) if codes[r] >= 0]
    if not finished:
        print("[lightning-gossip-launch] every worker was lost", file=sys.stderr, flush=True)
        return 1
    lost = [r for r in range(nproc) if codes[r] < 0]
    failed = [code for code in finished if code != 0]
    if lost and not failed:
        print(f"[lightning-gossip-launch] the run finished without rank(s) {lost}", file=sys.stderr, flush=True)
    return failed[0] if failed else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lightning-gossip-launch",
        description="Start N workers of a gossip run on this machine; a worker that dies leaves the others running "
        "(for on_peer_loss='continue'). The store is hosted by the launcher.",
    )
    parser.add_argument("--nproc", type=int, required=True, help="number of worker processes (>= 1)")
    parser.add_argument("--host", default="127.0.0.1", help="address the store listens on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="store port (default: a free one)")
    parser.add_argument("--kill-after", type=float, default=30.0,
                        help="seconds between passing on SIGINT/SIGTERM and killing workers still running")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="the script and its arguments (a .py file is run with this Python)")
    args = parser.parse_args(argv)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if command and command[0].endswith(".py"):
        command = [sys.executable, *command]
    try:
        return run(command, args.nproc, host=args.host, port=args.port, kill_after=args.kill_after)
    except ValueError as error:
        parser.error(str(error))
        return 2  # not reached


if __name__ == "__main__":
    sys.exit(main())
