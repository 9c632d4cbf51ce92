"""A callback the app tests add through Hydra (``+callbacks.samples._target_=tests.experiments.app_probes.
SampleRecorder``): it watches what the app feeds each rank, from outside, and changes nothing the app does (other than
slowing one rank down when asked to)."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from lightning.pytorch.callbacks import Callback


def _row_index(dataset: Any) -> dict[bytes, int]:
    rows = dataset.tensors[0].reshape(len(dataset), -1).numpy()
    index = {row.tobytes(): i for i, row in enumerate(rows)}
    assert len(index) == len(rows), "the probe tells samples apart by content: the training rows must be distinct"
    return index


class SampleRecorder(Callback):
    """Which training samples each rank trained on, per epoch, and how many validation and test samples it evaluated,
    written to ``<out_dir>/rank<r>.json`` at the end of every stage.

    A training sample is recognised by its content (the datamodule's training rows must be distinct), so the record
    says what reached ``training_step``, whatever sampler produced it. ``slow_rank`` sleeps ``delay_s`` before each
    of its training batches: a straggler, to see that the other ranks take more of the data.
    """

    def __init__(self, out_dir: str, slow_rank: Optional[int] = None, delay_s: float = 0.0) -> None:
        self.out_dir = Path(out_dir)
        self.slow_rank = slow_rank
        self.delay_s = float(delay_s)
        self.rows: dict[bytes, int] = {}
        self.train: dict[int, list[int]] = defaultdict(list)
        self.samplers: set[str] = set()
        self.evaluated: dict[str, list[int]] = defaultdict(list)  # stage -> samples per pass

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and not self.rows:
            self.rows = _row_index(trainer.datamodule.train_set)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.samplers.add(type(trainer.train_dataloader.sampler).__name__)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        x = batch[0].reshape(len(batch[0]), -1).cpu().numpy()
        self.train[trainer.current_epoch].extend(self.rows[row.tobytes()] for row in x)
        if trainer.global_rank == self.slow_rank:
            time.sleep(self.delay_s)

    def _evaluation_start(self, stage: str) -> None:
        self.evaluated[stage].append(0)

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._evaluation_start("val")

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._evaluation_start("test")

    def on_validation_batch_start(self, trainer: Any, pl_module: Any, batch: Any, *args: Any) -> None:
        self.evaluated["val"][-1] += len(batch[0])

    def on_test_batch_start(self, trainer: Any, pl_module: Any, batch: Any, *args: Any) -> None:
        self.evaluated["test"][-1] += len(batch[0])

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        dm = trainer.datamodule
        record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size, "samplers": sorted(self.samplers),
            "num_train": len(dm.train_set), "num_val": len(dm.val_set), "num_test": len(dm.test_set),
            "train": {str(epoch): indices for epoch, indices in sorted(self.train.items())},
            "evaluated": dict(self.evaluated),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
