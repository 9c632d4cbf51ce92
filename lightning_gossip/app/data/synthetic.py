"""Generated classification data (``data=synthetic``) whose size and difficulty scale."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from torch.utils.data import TensorDataset

from lightning_gossip.app.data.holdout import split_arrays
from lightning_gossip.app.data.module import ShardedDataModule


class SyntheticDataModule(ShardedDataModule):
    """Generated classification data (scikit-learn's ``make_classification``) whose size and difficulty scale.

    Args:
        num_samples: total samples (train + val + test).
        input_shape: shape of one input; its product is the number of features, e.g. ``[64]`` for an MLP or
            ``[3, 16, 16]`` to feed a CNN (the features are then just reshaped: no spatial structure).
        num_classes: number of classes.
        informative_fraction: fraction of the features that carry signal (the rest are noise or redundant).
        class_sep: separation of the class clusters (smaller: harder).
        label_noise: fraction of labels flipped at random (``flip_y``; an accuracy ceiling).
        clusters_per_class: Gaussian clusters per class (more: harder, needs a non-linear model).
        data_seed: fixes the generated dataset independently of the run's ``seed``.
    """

    def __init__(self, num_samples: int = 4000, input_shape: Sequence[int] = (64,), num_classes: int = 10,
                 informative_fraction: float = 0.5, class_sep: float = 1.0, label_noise: float = 0.01,
                 clusters_per_class: int = 2, val_fraction: float = 0.1, test_fraction: float = 0.2,
                 data_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(input_shape=input_shape, num_classes=num_classes, **kwargs)
        self.num_samples = int(num_samples)
        self.informative_fraction = float(informative_fraction)
        self.class_sep = float(class_sep)
        self.label_noise = float(label_noise)
        self.clusters_per_class = int(clusters_per_class)
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.data_seed = int(data_seed)

    def load(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        from sklearn.datasets import make_classification

        n_features = int(np.prod(self.input_shape))
        n_informative = max(1, int(round(self.informative_fraction * n_features)))
        n_informative = max(n_informative, int(np.ceil(np.log2(self.num_classes * self.clusters_per_class))))
        if n_informative > n_features:
            raise ValueError(f"{n_features} features are too few for {self.num_classes} classes x "
                             f"{self.clusters_per_class} clusters; enlarge input_shape.")
        n_redundant = min(n_features - n_informative, n_informative // 2)
        x, y = make_classification(
            n_samples=self.num_samples, n_features=n_features, n_informative=n_informative,
            n_redundant=n_redundant, n_classes=self.num_classes, n_clusters_per_class=self.clusters_per_class,
            class_sep=self.class_sep, flip_y=self.label_noise, random_state=self.data_seed,
        )
        x = ((x - x.mean(0)) / (x.std(0) + 1e-8)).astype(np.float32).reshape(-1, *self.input_shape)
        return split_arrays(x, y, self.val_fraction, self.test_fraction, self.data_seed)
