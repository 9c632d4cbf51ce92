"""The Hydra app (``python -m lightning_gossip.train``) as a real process tree in the tests: started in its own
session, every process of a run found by a marker in its environment, killed by pid after a failure."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from tests.helpers.processes import kill_group, script_env

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
