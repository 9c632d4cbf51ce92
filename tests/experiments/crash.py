"""A callback that kills one worker process mid-training, to test that a failed job does not poison the next."""

from __future__ import annotations

import os

from lightning.pytorch.callbacks import Callback


class KillRankAtStep(Callback):
    def __init__(self, rank: int = 1, at_step: int = 2) -> None:
        self.rank = rank
        self.at_step = at_step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank and trainer.global_step >= self.at_step:
            os._exit(3)  # no cleanup, like a crash or the OOM killer
