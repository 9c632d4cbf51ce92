"""The base of the app's datamodules: every rank builds its own training shard (or lets the strategy share work out).

Lock-step gossip needs every rank to take the same number of optimizer steps (a rank that stops early leaves its
peers waiting for a message that never comes), and non-IID experiments need shards that Lightning's
DistributedSampler cannot make. So, with ``Trainer(use_distributed_sampler=False)`` (``conf/trainer/default.yaml``
sets it for every strategy but the asynchronous one), these datamodules shard the training set themselves, from
``trainer.global_rank`` and ``trainer.world_size``, with shards of EQUAL length on every rank (:class:`ShardSampler`):

- ``split="iid"``: every epoch, one global permutation (the same on every rank, from ``seed`` and the epoch) is cut
  into ``world_size`` pieces of ``len(train) // world_size`` samples; like DistributedSampler, but without padding.
- ``split="label_skew"``: a fixed non-IID partition of the samples over the workers, drawn once from ``seed``
  (:func:`label_skew_partition`); each epoch every rank draws ``len(train) // world_size`` samples from its own part.

In asynchronous mode (``strategy.asynchronous=true``) the trainer config turns ``use_distributed_sampler`` on: the
datamodule then hands over the whole training set, shuffled, and ``GossipStrategy`` shares it out dynamically
(``WorkSharingSampler``: every sample once per epoch over all ranks, fast ranks take more batches). Label skew
cannot be shared out that way (it would be erased) and is refused then.

Validation and test sets are always cut into disjoint, unpadded slices (``rank::world_size``, :class:`RankSliceSampler`,
which Lightning keeps as it is); torchmetrics metrics sync their counts across ranks, so the reported accuracy is
exact.
"""

from __future__ import annotations

import logging
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_gossip.app.data.partition import SPLITS, label_skew_partition
from lightning_gossip.app.data.sampler import RankSliceSampler, ShardSampler

log = logging.getLogger(__name__)


class ShardedDataModule(pl.LightningDataModule):
    """Base class: subclasses fill ``self.train_set/val_set/test_set`` (TensorDatasets) in :meth:`load`.

    Args:
        batch_size: the per-worker batch size (a run with M workers takes M * batch_size samples per step).
        split: ``"iid"`` or ``"label_skew"``.
        alpha: Dirichlet concentration of the label skew (smaller: more skewed).
        classes_per_worker: if set, label skew gives each worker this many classes instead of Dirichlet shares.
        seed: seeds the split, the shard permutations and the partition; the same on every rank.
        num_workers: DataLoader worker processes per rank (0 is best for these in-memory tensors).
        input_shape / num_classes: what the dataset must produce; checked, and read by the model configs.
    """

    def __init__(
        self,
        batch_size: int = 32,
        split: str = "iid",
        alpha: float = 0.5,
        classes_per_worker: Optional[int] = None,
        seed: int = 0,
        num_workers: int = 0,
        input_shape: Optional[Sequence[int]] = None,
        num_classes: Optional[int] = None,
    ) -> None:
        super().__init__()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}.")
        self.batch_size = int(batch_size)
        self.split = split
        self.alpha = float(alpha)
        self.classes_per_worker = classes_per_worker
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.num_classes = num_classes
        self.train_set: Optional[TensorDataset] = None
        self.val_set: Optional[TensorDataset] = None
        self.test_set: Optional[TensorDataset] = None
        self.parts: Optional[list[np.ndarray]] = None

    # subclasses implement this
    def load(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        raise NotImplementedError

    def check(self) -> None:
        """Cheap checks (a local path exists, ...) that the entry point runs before it starts any worker process."""

    # -- rank helpers --------------------------------------------------------------------------------------------
    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return int(trainer.global_rank), int(trainer.world_size)

    def _lightning_shards(self) -> bool:
        """Whether Lightning will add a DistributedSampler itself (Trainer(use_distributed_sampler=True))."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return False
        return bool(getattr(trainer._accelerator_connector, "use_distributed_sampler", True))

    # -- LightningDataModule ------------------------------------------------------------------------------------
    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.load()
            x, _ = self.train_set[0]
            if self.input_shape is not None and tuple(x.shape) != self.input_shape:
                raise ValueError(f"{type(self).__name__} produces inputs of shape {tuple(x.shape)}, "
                                 f"but input_shape={list(self.input_shape)} was configured.")
            found = int(torch.cat([self.train_set.tensors[1], self.test_set.tensors[1]]).max()) + 1
            if self.num_classes is not None and found > self.num_classes:
                raise ValueError(f"{type(self).__name__} has labels up to {found - 1}, but num_classes="
                                 f"{self.num_classes} was configured.")
        rank, world = self._rank_world()
        if self.split == "label_skew" and self._lightning_shards():
            raise RuntimeError(
                "split='label_skew' builds each rank's shard itself; run with Trainer(use_distributed_sampler=False) "
                "(trainer.use_distributed_sampler=false) so that Lightning does not re-shard the data (in "
                "asynchronous mode it would be shared out dynamically, which erases the skew)."
            )
        if self.split == "label_skew" and world > 1 and self.parts is None:
            labels = self.train_set.tensors[1].numpy()
            self.parts = label_skew_partition(labels, world, self.seed, self.alpha, self.classes_per_worker)
            mine = np.bincount(labels[self.parts[rank]], minlength=int(labels.max()) + 1)
            log.info("rank %d label-skew part: %d samples, class counts %s", rank, len(self.parts[rank]), mine.tolist())

    def train_sampler(self) -> Optional[ShardSampler]:
        rank, world = self._rank_world()
        if self._lightning_shards():
            return None
        return ShardSampler(len(self.train_set), rank, world, self.seed, self.parts if world > 1 else None)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        sampler = self.train_sampler()
        if sampler is None:  # Lightning shards it (asynchronous gossip: shares it out), shuffled every epoch
            return self._loader(self.train_set, shuffle=True)
        # every rank's shard has the same length, so every rank takes the same number of steps
        return self._loader(self.train_set, sampler=sampler)

    def _eval_loader(self, dataset: TensorDataset) -> DataLoader:
        rank, world = self._rank_world()
        if world <= 1:
            return self._loader(dataset)
        return self._loader(dataset, sampler=RankSliceSampler(dataset, world, rank))

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def label_counts(self, rank: int) -> np.ndarray:
        """Class counts of ``rank``'s training part (for reports); IID: of the whole training set / world."""
        labels = self.train_set.tensors[1].numpy()
        if self.parts is None:
            return np.bincount(labels, minlength=int(labels.max()) + 1)
        return np.bincount(labels[self.parts[rank]], minlength=int(labels.max()) + 1)
