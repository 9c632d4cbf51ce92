"""Running scripts and modules as real process trees, with hard timeouts and a check that nothing survives.

Each command runs in a process group of its own (``start_new_session``), so the test can wait for every process it
started, report the ones that outlive it, and kill them all by group, never by name."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[2]


def script_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore")
    env.pop("LOCAL_RANK", None)  # a stray LOCAL_RANK would stop Lightning's launcher from starting the other ranks
    env.update(extra)
    return env


def group_members(pgid: int) -> list[int]:
    """The pids of the live (not zombie) processes in process group ``pgid``."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # Fields after the command name (which may contain spaces), see proc(5): state is 3rd, pgrp 5th.
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(entry))
    return members


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Run:
    def __init__(self, returncode: int, output: str, elapsed: float, survivors: list[int], ended_at: float) -> None:
        self.returncode = returncode
        self.output = output
        self.elapsed = elapsed
        self.survivors = survivors  # processes of the run still alive `linger` seconds after the launcher ended
        self.ended_at = ended_at  # time.time() when the last process of the run was gone (or `linger` ran out)

    def __repr__(self) -> str:
        return f"Run(rc={self.returncode}, elapsed={self.elapsed:.1f}s, survivors={self.survivors})"


def run_script(script: Path, args: list[str], timeout: float, **kwargs: object) -> Run:
    """Run the Python script ``script`` with ``args`` (see :func:`run_command`)."""
    return run_command([sys.executable, str(script), *args], timeout, **kwargs)  # type: ignore[arg-type]


def run_command(
    cmd: list[str],
    timeout: float,
    linger: float = 30.0,
    env: Optional[dict[str, str]] = None,
    cwd: Optional[Path] = None,
) -> Run:
    """Run ``cmd`` in its own process group; wait for it and every process it started.

    The output is stdout and stderr together. Whatever is still alive after ``timeout`` (the command) or ``linger``
    more seconds (its workers) is reported in ``survivors`` and then killed, so a failing test never leaves processes
    behind; a command that does not finish within ``timeout`` fails the test with its output.
    """
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=str(cwd or ROOT),
        env=env or script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    pgid = proc.pid
    try:
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(pgid)
            output, _ = proc.communicate()
            raise AssertionError(
                f"{cmd} did not finish within {timeout}s; output:\n{output.decode(errors='replace')[-5000:]}"
            ) from None
        deadline = time.monotonic() + linger
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        survivors = group_members(pgid)
        return Run(proc.returncode, output.decode(errors="replace"), time.monotonic() - start, survivors, time.time())
    finally:
        kill_group(pgid)
