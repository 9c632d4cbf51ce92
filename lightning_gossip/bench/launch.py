"""Starting benchmark workers the way ``torchrun`` starts them, one process per rank, and stopping them.

Each worker gets ``MASTER_ADDR``, ``MASTER_PORT``, ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``,
``GROUP_RANK``, ``ROLE_RANK`` and ``TORCHELASTIC_RUN_ID`` in its environment, so Lightning's
``TorchElasticEnvironment`` picks the ranks up, and runs in a process group of its own (``start_new_session``), so
everything it starts is stopped with it. On a :class:`~lightning_gossip.bench.netns.Network` every worker is its own
"node" (``torchrun --nnodes M --nproc-per-node 1``) inside its own network namespace. Shared by
``python -m lightning_gossip.bench`` and the project's own suites (``python -m experiments.benchmark``).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

from lightning_gossip.bench import netns


# Debugging switches a benchmark's workers run without: they add checks (and collectives) around every collective or
# at every quiescent point, so the timings would measure the checks. (With TORCH_DISTRIBUTED_DEBUG=DETAIL, which the
# test suite sets, the DDP runs of both harnesses also died with a segmentation fault here, torch 2.13.0.)
DEBUG_VARIABLES = ("TORCH_DISTRIBUTED_DEBUG", "LIGHTNING_GOSSIP_VERIFY")


class WorkerFailed(RuntimeError):
    """A worker exited with an error: ``rank`` and ``returncode`` say which and how; ``log`` is its output file."""

    def __init__(self, message: str, rank: int, returncode: int, log: str) -> None:
        super().__init__(message)
        self.rank = rank
        self.returncode = returncode
        self.log = log


def terminate(procs: Sequence[subprocess.Popen], grace: float = 5.0) -> None:
    """Stop the workers this harness started (each leads its own process group): SIGTERM, then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def worker_env(network: Any, rank: int, world_size: int, port: int, label: str,
               pythonpath: Sequence[str] = ()) -> dict[str, str]:
    """The environment of worker ``rank``: one thread, torchrun's variables, gloo on the network's interface."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([*pythonpath, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]),
        PYTHONWARNINGS="ignore",
        BENCH_IFNAME=network.IFNAME,
    )
    for stale in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK"):
        env.pop(stale, None)  # a variable left over from the caller's own launch would confuse Lightning
    for debug in DEBUG_VARIABLES:
        env.pop(debug, None)
    if world_size > 1:
        one_node_per_worker = isinstance(network, netns.Network)
        local_world = 1 if one_node_per_worker else world_size
        env.update(
            MASTER_ADDR=network.master_addr,
            MASTER_PORT=str(port),
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(0 if one_node_per_worker else rank),
            LOCAL_WORLD_SIZE=str(local_world),
            GROUP_RANK=str(rank if one_node_per_worker else 0),
            GROUP_WORLD_SIZE=str(world_size // local_world),
            ROLE_RANK=str(rank),
            ROLE_WORLD_SIZE=str(world_size),
            TORCHELASTIC_RUN_ID=f"lgbench-{label}",
            GLOO_SOCKET_IFNAME=network.IFNAME,
        )
    return env


def launch(
    network: Any,
    world_size: int,
    plan: dict,
    out_dir: str,
    log_dir: str,
    label: str,
    timeout: float,
    worker_module: str,
    cwd: str,
    pythonpath: Sequence[str] = (),
    poll: Optional[Callable[[], None]] = None,
) -> None:
    """Run ``plan`` on ``world_size`` processes of ``python -m worker_module --plan PLAN --out OUT_DIR``.

    Returns when every worker exited 0. Raises :class:`WorkerFailed` as soon as one exits with an error (the others
    are stopped), and ``TimeoutError`` after ``timeout`` seconds. ``poll`` is called about four times a second while
    the workers run (a progress display).
    """
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(log_dir, exist_ok=True)
    plan_path = os.path.join(out_dir, "plan.json")
    with open(plan_path, "w") as f:
        json.dump(plan, f)
    # Inside namespaces every worker has its own port space; on loopback the port must be free on this machine.
    port = 20000 + secrets.randbelow(20000) if isinstance(network, netns.Network) else netns.free_port()
    procs: list[subprocess.Popen] = []
    logs = []
    try:
        for rank in range(world_size):
            env = worker_env(network, rank, world_size, port, label, pythonpath)
            cmd = network.wrap(rank, [sys.executable, "-m", worker_module, "--plan", plan_path, "--out", out_dir])
            logf = open(os.path.join(log_dir, f"{label}_rank{rank}.log"), "w")
            logs.append(logf)
            procs.append(subprocess.Popen(cmd, env=env, cwd=cwd, stdout=logf, stderr=subprocess.STDOUT,
                                          start_new_session=True))
        deadline = time.time() + timeout
        while True:
            codes = [p.poll() for p in procs]
            failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                rank = failed[0]
                log = os.path.join(log_dir, f"{label}_rank{rank}.log")
                raise WorkerFailed(f"worker rank {rank} of {label} exited with {codes[rank]}; see {log}",
                                   rank, int(codes[rank]), log)
            if all(c == 0 for c in codes):
                return
            if time.time() > deadline:
                raise TimeoutError(f"{label} did not finish within {timeout:.0f} s")
            if poll is not None:
                poll()
            time.sleep(0.25)
    finally:
        terminate(procs)
        for f in logs:
            f.close()
