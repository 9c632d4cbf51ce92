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


# -- the Hydra app (python -m lightning_gossip.train) as a real process tree ----------------------------------------
# The elastic agent starts every worker in a session of its own, so a process group does not reach them: every
# process of one app run carries APP_RUN_ENV=<a fresh id> in its environment, and that is how the tests find (and,
# after a failure, kill by pid) whatever the run left behind.
APP_RUN_ENV = "LIGHTNING_GOSSIP_TEST_RUN"
_DIST_KEYS = ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR", "NODE_RANK", "RANK", "GROUP_RANK",
              "LIGHTNING_GOSSIP_WORKER_CONFIG", "LIGHTNING_GOSSIP_PARENT_PID", "TORCHELASTIC_RUN_ID")


def processes_with_env(needle: str) -> list[int]:
    """The pids of live (not zombie) processes whose environment contains ``needle`` (this process excluded)."""
    pids, raw = [], needle.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read()
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        if raw in environ and stat[stat.rfind(")") + 2:].split()[0] != "Z":
            pids.append(int(entry))
    return pids


class AppRun:
    """``python -m lightning_gossip.train ARGS`` started in ``cwd`` in its own session; output goes to a file."""

    def __init__(self, args: list[str], cwd: Path, extra_env: Optional[dict[str, str]] = None) -> None:
        import uuid

        self.tag = f"{APP_RUN_ENV}={uuid.uuid4().hex}"
        env = script_env(HYDRA_FULL_ERROR="1", **(extra_env or {}))
        for key in _DIST_KEYS:
            env.pop(key, None)
        env[APP_RUN_ENV] = self.tag.split("=", 1)[1]
        self.log_path = Path(cwd) / f"app-{self.tag[-8:]}.log"
        self._log = open(self.log_path, "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "lightning_gossip.train", *args], cwd=str(cwd), env=env,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def output(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def members(self) -> list[int]:
        """Live processes of this run (the Hydra process and every worker it started)."""
        return processes_with_env(self.tag)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the app did not finish within {timeout}s; output:\n{self.output[-6000:]}") from None

    def survivors(self, linger: float = 10.0) -> list[int]:
        deadline = time.monotonic() + linger
        while self.members() and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.members()

    def kill(self) -> None:
        """SIGKILL the run's process group and every process of the run by pid."""
        kill_group(self.proc.pid)
        for pid in self.members():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def __enter__(self) -> "AppRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
        self._log.close()


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)
