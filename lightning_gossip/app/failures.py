"""The report of a failed worker group: which rank failed first and how, and which ones the agent then stopped."""

from __future__ import annotations

import signal
from typing import Any

from lightning_gossip.gossip.launch import describe_exit  # one wording of a process's exit for both launchers


def restarts_note(max_restarts: int) -> str:
    return f" after {max_restarts} restart(s)" if max_restarts else ""


def describe_failures(failures: dict[int, Any]) -> str:
    """The ranks that failed first; those the agent then stopped itself (SIGTERM) are listed apart.

    ``failures`` maps a rank to its ``ProcessFailure`` (``ChildFailedError.failures`` of torch's elastic agent).
    A rank killed by a signal the agent did not send (the OOM killer, a preempted node) is listed before ranks that
    exited with an error: those usually raised because they lost that peer, and may do so before the agent's next
    poll sees the killed one, so one poll can hold both.
    """
    stopped = {rank for rank, f in failures.items() if f.exitcode == -int(signal.SIGTERM)}
    causes = sorted(set(failures) - stopped, key=lambda rank: (failures[rank].exitcode >= 0, rank)) or sorted(stopped)
    text = ", ".join(f"rank {rank}: {describe_exit(failures[rank].exitcode)}" for rank in causes)
    if stopped and causes != sorted(stopped):
        text += "; stopped after it: " + ", ".join(f"rank {rank}" for rank in sorted(stopped))
    return text
