"""scikit-learn's 8x8 handwritten digits (``data=digits``, the default run's data)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch.utils.data import TensorDataset

from lightning_gossip.app.data.holdout import split_arrays
from lightning_gossip.app.data.module import ShardedDataModule


class DigitsDataModule(ShardedDataModule):
    """scikit-learn's 8x8 handwritten digits (1797 images, 10 classes; shipped with scikit-learn, no download).

    Inputs are scaled to [0, 1] and shaped (1, 8, 8). The split is stratified: by default 70% train, 10% val,
    20% test (1257 / 180 / 360 images).
    """

    def __init__(self, val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0,
                 **kwargs: Any) -> None:
        kwargs.setdefault("input_shape", (1, 8, 8))
        kwargs.setdefault("num_classes", 10)
        super().__init__(**kwargs)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed

    def load(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
        return split_arrays(x, digits.target, self.val_fraction, self.test_fraction, self.split_seed)
