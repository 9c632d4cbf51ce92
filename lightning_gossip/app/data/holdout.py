"""Train/validation/test holdout of in-memory arrays (stratified where the classes allow it), as TensorDatasets."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset


def train_test_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> list[np.ndarray]:
    """Stratified when the classes allow it (small folders may not), else plain random."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(x, y, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:
        return train_test_split(x, y, test_size=fraction, random_state=seed)


def split_arrays(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
                  ) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """A stratified train/val/test split (fixed by ``seed``) into float32 / int64 TensorDatasets."""
    x_rest, x_test, y_rest, y_test = train_test_split(x, y, test_fraction, seed)
    x_train, x_val, y_train, y_val = train_test_split(x_rest, y_rest, val_fraction / (1.0 - test_fraction), seed)

    def ds(a: np.ndarray, b: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.int64))

    return ds(x_train, y_train), ds(x_val, y_val), ds(x_test, y_test)
