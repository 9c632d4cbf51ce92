"""Callbacks the app tests add to real ``python -m lightning_gossip.train`` runs (``+callbacks.NAME._target_=...``):
faults injected from inside a worker, and markers that tell a test when the workers are training."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback


class KillOnce(Callback):
    """Rank ``rank`` sends itself ``signum`` after global step ``at_step``, in the first attempt of the worker group
    only (``TORCHELASTIC_RESTART_COUNT`` 0): a restarted group trains on. Notes the time in ``marker_dir/fault.txt``."""

    def __init__(self, marker_dir: str, rank: int = 1, at_step: int = 6, signum: int = int(signal.SIGKILL)) -> None:
        self.marker_dir, self.rank, self.at_step, self.signum = Path(marker_dir), rank, at_step, signum

    def on_train_batch_end(self, trainer, *args) -> None:
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return
        if trainer.global_rank == self.rank and trainer.global_step >= self.at_step:
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            (self.marker_dir / "fault.txt").write_text(f"{time.time()}\nrank {self.rank} pid {os.getpid()}\n")
            print(f"FAULT: rank {self.rank} (pid {os.getpid()}) sends itself signal {self.signum} after step "
                  f"{trainer.global_step}", flush=True)
            os.kill(os.getpid(), self.signum)


class MarkTraining(Callback):
    """Writes ``marker_dir/training_rank{r}`` (the pid) once the rank trains, and slows every step by ``sleep_s``."""

    def __init__(self, marker_dir: str, sleep_s: float = 0.0) -> None:
        self.marker_dir, self.sleep_s = Path(marker_dir), sleep_s

    def on_train_batch_end(self, trainer, *args) -> None:
        marker = self.marker_dir / f"training_rank{trainer.global_rank}"
        if not marker.exists():
            self.marker_dir.mkdir(parents=True, exist_ok=True)
            marker.write_text(str(os.getpid()))
        if self.sleep_s:
            time.sleep(self.sleep_s)
