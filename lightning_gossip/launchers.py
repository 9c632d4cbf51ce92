"""Lightning's launchers, with what gossip adds: checks before any worker starts, a report of a lost worker, and the
consensus handed back by the spawn launcher.

The launchers know nothing of the strategy: they are given callables.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import AbstractContextManager, nullcontext, suppress
from subprocess import Popen
from typing import Any, Callable, Optional

from lightning.pytorch.utilities.exceptions import SIGTERMException
from typing_extensions import override

import lightning.pytorch as pl
from lightning_gossip._lightning_compat import _get_sigkill_signal, _MultiProcessingLauncher, _SubprocessScriptLauncher

BeforeLaunch = Callable[[Optional["pl.Trainer"]], None]
ResultsContext = Callable[["pl.Trainer"], AbstractContextManager]


class GossipSubprocessScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's popen launcher (it re-runs the script for ranks 1..M-1), plus:

    - ``before_launch(trainer)`` runs before any process is started (checks that need the model);
    - a reporter thread that writes to stderr which worker was lost and how, within a fraction of a second. Lightning's
      own observer then stops every process (every 5 s it looks, and on a failed child kills all, rank 0 included),
      so without the report the only trace is a log line at INFO level, which is often not shown.
    """

    def __init__(self, *args: Any, before_launch: BeforeLaunch, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._before_launch = before_launch

    @override
    def launch(self, function: Callable, *args: Any, trainer: Optional["pl.Trainer"] = None, **kwargs: Any) -> Any:
        self._before_launch(trainer)
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except SIGTERMException as stopped:
            # Lightning stops a fit after SIGTERM with SIGTERMException(), a SystemExit with exit code 0: a
            # preempted run would look like a finished one to torchrun's agent, a scheduler or CI.
            if stopped.code in (None, 0):
                raise SIGTERMException(128 + int(signal.SIGTERM)) from stopped
            raise

    @override
    def _call_children_scripts(self) -> None:
        super()._call_children_scripts()
        self._reporter = _LostWorkerReporter(self.procs)
        self._reporter.start()

    def stop_children(self) -> None:
        """Kill the worker processes this launcher started (rank 0 failed: none must be left waiting for it).

        First, the workers that are gone already are reported as lost (rank 0 usually fails because one of them
        died, and kills the others before the reporter's next look); then the reporter is stopped, so the workers
        killed here are never reported as lost.
        """
        if not self.procs:
            return
        reporter = getattr(self, "_reporter", None)
        if reporter is not None:
            reporter.stop()
        for rank, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if _lost(code) and (reporter is None or rank not in reporter.reported):
                sys.stderr.write(lost_worker_message(rank, proc.pid, code))
        sys.stderr.flush()
        self.kill(_get_sigkill_signal())
        for proc in self.procs:
            with suppress(Exception):
                proc.wait(timeout=10)


class _LostWorkerReporter(threading.Thread):
    """Polls the worker processes and reports the first that exits with an error (rank, pid, signal or code)."""

    def __init__(self, procs: list[Popen], interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="lightning-gossip-lost-worker-reporter")
        self._procs = procs
        self._interval = interval
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self.reported: set[int] = set()

    def stop(self) -> None:
        """No report after this returns (the caller is about to kill the workers itself)."""
        with self._lock:
            self._finished.set()

    def run(self) -> None:
        while not self._finished.wait(self._interval):
            with self._lock:
                if self._finished.is_set():
                    return
                codes = [proc.poll() for proc in self._procs]
                for rank, code in enumerate(codes, start=1):
                    if _lost(code):
                        self.reported.add(rank)
                        sys.stderr.write(lost_worker_message(rank, self._procs[rank - 1].pid, code))
                        sys.stderr.flush()
                        return
                if all(code is not None and not _lost(code) for code in codes):
                    return


def _lost(code: Optional[int]) -> bool:
    """A worker that ended with an error; not one stopped by SIGTERM (preemption: exit code 143, or the signal)."""
    return bool(code) and code not in (128 + int(signal.SIGTERM), -int(signal.SIGTERM))


def lost_worker_message(rank: int, pid: int, code: int) -> str:
    if code < 0 and -code in signal.valid_signals():
        how = f"signal {signal.Signals(-code).name}"
    else:
        how = f"exit code {code}"
    return (
        f"GossipStrategy: lost worker rank {rank} (pid {pid}, {how}). Stopping every worker process, rank 0 "
        "included, so that none is left waiting for it; restart from the last checkpoint "
        "(Trainer.fit(ckpt_path=...)).\n"
    )


class GossipMultiProcessingLauncher(_MultiProcessingLauncher):
    """Lightning's spawn/fork launcher, plus ``before_launch(trainer)`` before any process starts, and
    ``results_context(trainer)`` around handing rank 0's module back to the parent (gossip: the consensus model)."""

    def __init__(
        self, *args: Any, before_launch: BeforeLaunch, results_context: Optional[ResultsContext] = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self._before_launch = before_launch
        self._results_context = results_context or (lambda trainer: nullcontext())

    @override
    def launch(self, function: Callable, *args: Any, trainer: Optional["pl.Trainer"] = None, **kwargs: Any) -> Any:
        self._before_launch(trainer)
        return super().launch(function, *args, trainer=trainer, **kwargs)

    @override
    def _collect_rank_zero_results(self, trainer: "pl.Trainer", results: Any) -> Any:
        # Every rank runs this, so a collective inside the context is matched.
        with self._results_context(trainer):
            return super()._collect_rank_zero_results(trainer, results)
