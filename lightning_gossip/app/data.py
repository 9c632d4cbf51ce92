"""LightningDataModules for gossip experiments: each rank builds its own training shard.

Gossip needs every rank to take the same number of optimizer steps (a rank that stops early leaves its peers
waiting for a message that never comes), and non-IID experiments need shards that Lightning's DistributedSampler
cannot make. So these datamodules shard the training set themselves, from ``trainer.global_rank`` and
``trainer.world_size``, with shards of EQUAL length on every rank:

- ``split="iid"``: every epoch, one global permutation (the same on every rank, from ``seed`` and the epoch) is cut
  into ``world_size`` slices of ``len(train) // world_size`` samples; like DistributedSampler, but without padding.
- ``split="label_skew"``: a fixed non-IID partition of the samples over the workers, drawn once from ``seed``:
  either Dirichlet(``alpha``) class proportions per worker, or ``classes_per_worker`` classes per worker. Each epoch
  every rank draws ``len(train) // world_size`` samples from its own part (all of it in a new order, cycled when the
  part is smaller), so shard lengths stay equal however uneven the partition is.

Validation and test sets are cut into disjoint, unpadded slices (``rank::world_size``); torchmetrics metrics sync
their counts across ranks, so the reported accuracy is exact.

Use them with ``Trainer(use_distributed_sampler=False)`` (``conf/trainer/*.yaml`` set it). If Lightning is left to
shard, the IID split falls back to Lightning's DistributedSampler and ``label_skew`` raises an error.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from typing import Any, Optional, Sequence

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset

from lightning_gossip.app.mnist1d_cache import mnist1d_arrays as _mnist1d_arrays

log = logging.getLogger(__name__)

SPLITS = ("iid", "label_skew")


# ---------------------------------------------------------------------------------------------------------------------
# partitions and the per-rank sampler
# ---------------------------------------------------------------------------------------------------------------------
def label_skew_partition(
    labels: np.ndarray,
    world_size: int,
    seed: int,
    alpha: float = 0.5,
    classes_per_worker: Optional[int] = None,
) -> list[np.ndarray]:
    """Assign every sample to one worker so that the workers' label distributions differ.

    With ``classes_per_worker=k`` each worker gets samples of k classes only (class c is split evenly among the
    workers that hold it; ``k * world_size`` must cover every class); otherwise each class is split over the
    workers in Dirichlet(alpha) proportions (small alpha: strong skew; large alpha: close to IID). Every worker gets
    at least one sample. The result depends only on (labels, world_size, seed, alpha, classes_per_worker), so every
    rank computes the same partition.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(world_size)]
    if classes_per_worker is not None:
        k = int(classes_per_worker)
        if not 1 <= k <= len(classes):
            raise ValueError(f"classes_per_worker must be in [1, {len(classes)}], got {classes_per_worker!r}.")
        if world_size * k < len(classes):
            raise ValueError(
                f"classes_per_worker={k} with {world_size} workers covers only {world_size * k} of {len(classes)} "
                f"classes; use classes_per_worker >= {-(-len(classes) // world_size)} (or the Dirichlet alpha)."
            )
        # Worker w holds classes (w*k + j) mod C, so every class is held by someone; a class held by several
        # workers is split evenly among them.
        holders: dict[int, list[int]] = {int(c): [] for c in classes}
        for w in range(world_size):
            for j in range(k):
                holders[int(classes[(w * k + j) % len(classes)])].append(w)
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            owners = holders[int(c)]
            for chunk, w in zip(np.array_split(idx, len(owners)), owners):
                parts[w].extend(chunk.tolist())
    else:
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}.")
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            share = rng.dirichlet(np.full(world_size, float(alpha)))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for w, chunk in enumerate(np.split(idx, cuts)):
                parts[w].extend(chunk.tolist())
    # No empty worker: give an empty one a sample from the largest part.
    for w in range(world_size):
        if not parts[w]:
            donor = max(range(world_size), key=lambda v: len(parts[v]))
            parts[w].append(parts[donor].pop())
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


class ShardSampler(Sampler[int]):
    """This rank's training indices for one epoch; ``len`` is the same on every rank.

    Lightning calls :meth:`set_epoch` at the start of every epoch (also without a DistributedSampler), which
    changes the order (IID: also the content) of the shard.
    """

    def __init__(
        self,
        num_samples: int,
        rank: int,
        world_size: int,
        seed: int = 0,
        parts: Optional[Sequence[np.ndarray]] = None,
        shuffle: bool = True,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}.")
        if num_samples < world_size:
            raise ValueError(f"{num_samples} training samples cannot be split over {world_size} workers.")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.parts = parts
        self.shuffle = shuffle
        self.epoch = 0
        self.shard_size = num_samples // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        if self.parts is None:  # IID: a slice of one global permutation, the same on every rank
            rng = np.random.default_rng([self.seed, self.epoch])
            order = rng.permutation(self.num_samples) if self.shuffle else np.arange(self.num_samples)
            return order[self.rank * self.shard_size : (self.rank + 1) * self.shard_size]
        part = np.asarray(self.parts[self.rank])
        rng = np.random.default_rng([self.seed, self.epoch, self.rank])
        reps = -(-self.shard_size // len(part))  # ceil
        pool = np.concatenate([rng.permutation(part) if self.shuffle else part for _ in range(reps)])
        return pool[: self.shard_size]

    def __iter__(self):
        return iter(self.indices().tolist())

    def __len__(self) -> int:
        return self.shard_size


# ---------------------------------------------------------------------------------------------------------------------
# the shared datamodule
# ---------------------------------------------------------------------------------------------------------------------
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
                "(trainer.use_distributed_sampler=false) so that Lightning does not re-shard the data."
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
        if sampler is None:  # Lightning's DistributedSampler shards (and shuffles) it
            return self._loader(self.train_set, shuffle=True)
        # every rank's shard has the same length, so every rank takes the same number of steps
        return self._loader(self.train_set, sampler=sampler)

    def _eval_shard(self, dataset: TensorDataset) -> Dataset:
        rank, world = self._rank_world()
        if world <= 1 or self._lightning_shards():
            return dataset
        return torch.utils.data.Subset(dataset, list(range(rank, len(dataset), world)))

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._eval_shard(self.val_set))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._eval_shard(self.test_set))

    def label_counts(self, rank: int) -> np.ndarray:
        """Class counts of ``rank``'s training part (for reports); IID: of the whole training set / world."""
        labels = self.train_set.tensors[1].numpy()
        if self.parts is None:
            return np.bincount(labels, minlength=int(labels.max()) + 1)
        return np.bincount(labels[self.parts[rank]], minlength=int(labels.max()) + 1)


def _train_test_split(x: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> list[np.ndarray]:
    """Stratified when the classes allow it (small folders may not), else plain random."""
    from sklearn.model_selection import train_test_split

    try:
        return train_test_split(x, y, test_size=fraction, random_state=seed, stratify=y)
    except ValueError:
        return train_test_split(x, y, test_size=fraction, random_state=seed)


def _split_arrays(x: np.ndarray, y: np.ndarray, val_fraction: float, test_fraction: float, seed: int
                  ) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
    """A stratified train/val/test split (fixed by ``seed``) into float32 / int64 TensorDatasets."""
    x_rest, x_test, y_rest, y_test = _train_test_split(x, y, test_fraction, seed)
    x_train, x_val, y_train, y_val = _train_test_split(x_rest, y_rest, val_fraction / (1.0 - test_fraction), seed)

    def ds(a: np.ndarray, b: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.int64))

    return ds(x_train, y_train), ds(x_val, y_val), ds(x_test, y_test)


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
        return _split_arrays(x, digits.target, self.val_fraction, self.test_fraction, self.split_seed)


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
        return _split_arrays(x, y, self.val_fraction, self.test_fraction, self.data_seed)


class Mnist1dDataModule(ShardedDataModule):
    """MNIST-1D (Greydanus 2020): 1-D signals of length 40 made from the ten digit templates, shifted, scaled,
    sheared and noised; generated locally by the ``mnist1d`` package (no download) and cached on disk.

    A small task on which model, communication and data split make a visible difference (linear models reach
    ~32 %, the paper's MLP ~68 %, its CNN ~94 %), unlike scikit-learn's digits.

    Args:
        num_samples: samples generated (train + test); the generator's ``train_split`` makes the test set, and
            ``val_fraction`` of the training part (stratified) becomes the validation set. The default 20 000
            gives 14 400 training samples: 900 per worker with 16 workers.
        data_seed: the generator's seed; the dataset does not change with the run's ``seed``.
        cache_dir: where the generated arrays are cached (keyed by every generator argument); None: no cache.
    """

    def __init__(self, num_samples: int = 20000, data_seed: int = 42, train_split: float = 0.8,
                 val_fraction: float = 0.1, split_seed: int = 0, cache_dir: Optional[str] = None,
                 **kwargs: Any) -> None:
        kwargs.setdefault("input_shape", (40,))
        kwargs.setdefault("num_classes", 10)
        super().__init__(**kwargs)
        if int(num_samples) < 100:
            raise ValueError(f"num_samples must be >= 100, got {num_samples!r}.")
        if not 0.0 < float(train_split) < 1.0:
            raise ValueError(f"train_split must be in (0, 1), got {train_split!r}.")
        if not 0.0 < float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}.")
        self.num_samples = int(num_samples)
        self.data_seed = int(data_seed)
        self.train_split = float(train_split)
        self.val_fraction = float(val_fraction)
        self.split_seed = int(split_seed)
        self.cache_dir = cache_dir

    def load(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        a = _mnist1d_arrays(self.num_samples, self.data_seed, self.train_split, self.cache_dir)
        shape = self.input_shape or (40,)
        x_train, x_val, y_train, y_val = _train_test_split(a["x"], a["y"], self.val_fraction, self.split_seed)

        def ds(x: np.ndarray, y: np.ndarray) -> TensorDataset:
            return TensorDataset(torch.as_tensor(x, dtype=torch.float32).reshape(-1, *shape),
                                 torch.as_tensor(y, dtype=torch.int64))

        return ds(x_train, y_train), ds(x_val, y_val), ds(a["x_test"], a["y_test"])


class ImageFolderDataModule(ShardedDataModule):
    """Your own images from a local path, without torchvision: an ImageFolder tree or CIFAR-10 python batches.

    - ``format="imagefolder"``: ``path/<class name>/<image files>`` (classes sorted by name, as torchvision's
      ImageFolder does); or ``path/train/<class>/...`` plus optional ``path/val/...`` and ``path/test/...``. Images
      are opened with Pillow, converted to RGB (or L with ``channels=1``), resized to ``image_size`` and held in
      memory, so this suits datasets up to some hundred thousand small images.
    - ``format="cifar10"``: the directory of the "CIFAR-10 python version" (``data_batch_1`` ... ``data_batch_5``,
      ``test_batch``), e.g. ``cifar-10-batches-py`` as extracted from ``cifar-10-python.tar.gz``.
    - ``format="auto"``: cifar10 if ``path/data_batch_1`` exists, else imagefolder.

    Inputs are scaled to [0, 1] and normalised per channel with the training set's mean and std. Nothing is
    downloaded: a missing path is an error that says what was expected.
    """

    IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

    def __init__(self, path: Optional[str] = None, format: str = "auto", image_size: Sequence[int] = (32, 32),
                 channels: int = 3, val_fraction: float = 0.1, test_fraction: float = 0.2, split_seed: int = 0,
                 max_per_class: Optional[int] = None, **kwargs: Any) -> None:
        kwargs.setdefault("input_shape", (channels, *image_size))
        super().__init__(**kwargs)
        if format not in ("auto", "imagefolder", "cifar10"):
            raise ValueError(f"format must be 'auto', 'imagefolder' or 'cifar10', got {format!r}.")
        self.path = path
        self.format = format
        self.image_size = tuple(int(s) for s in image_size)
        self.channels = int(channels)
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels!r}.")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.split_seed = split_seed
        self.max_per_class = max_per_class
        self.class_names: list[str] = []

    def check(self) -> None:
        self._root()

    def _root(self) -> Path:
        if not self.path:
            raise FileNotFoundError(
                "data=image_folder needs a local dataset: pass data.path=/path/to/images (an ImageFolder tree "
                "path/<class>/<image>) or the extracted CIFAR-10 python batches "
                "(data.path=/path/to/cifar-10-batches-py)."
                " Nothing is downloaded."
            )
        root = Path(os.path.expanduser(str(self.path))).resolve()
        if not root.is_dir():
            raise FileNotFoundError(
                f"data.path={self.path!r} ({root}) is not a directory. Expected an ImageFolder tree "
                "(path/<class>/<image>) or the CIFAR-10 python batches (data_batch_1..5, test_batch)."
            )
        return root

    # -- CIFAR-10 python batches ----------------------------------------------------------------------------------
    @staticmethod
    def _read_cifar_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        data = batch.get(b"data", batch.get("data"))
        labels = batch.get(b"labels", batch.get("labels"))
        if data is None or labels is None:
            raise ValueError(f"{file} is not a CIFAR-10 python batch (no 'data'/'labels').")
        return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(labels, dtype=np.int64)

    def _load_cifar(self, root: Path) -> tuple[np.ndarray, np.ndarray, Optional[tuple[np.ndarray, np.ndarray]]]:
        train_files = sorted(root.glob("data_batch_*"))
        if not train_files:
            raise FileNotFoundError(f"No CIFAR-10 batches (data_batch_1 ... data_batch_5) in {root}.")
        parts = [self._read_cifar_batch(f) for f in train_files]
        x = np.concatenate([p[0] for p in parts])
        y = np.concatenate([p[1] for p in parts])
        test = self._read_cifar_batch(root / "test_batch") if (root / "test_batch").exists() else None
        meta = root / "batches.meta"
        if meta.exists():
            with open(meta, "rb") as f:
                names = pickle.load(f, encoding="bytes").get(b"label_names", [])
            self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]
        return x, y, test

    # -- ImageFolder ----------------------------------------------------------------------------------------------
    def _read_tree(self, root: Path, classes: Optional[list[str]] = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
        from PIL import Image

        if classes is None:
            classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise FileNotFoundError(f"No class folders in {root}: expected {root}/<class name>/<image files>.")
        mode = "RGB" if self.channels == 3 else "L"
        xs, ys = [], []
        for label, name in enumerate(classes):
            files = sorted(f for f in (root / name).rglob("*") if f.suffix.lower() in self.IMAGE_SUFFIXES)
            if self.max_per_class:
                files = files[: self.max_per_class]
            for f in files:
                with Image.open(f) as img:
                    img = img.convert(mode).resize((self.image_size[1], self.image_size[0]))
                    arr = np.asarray(img, dtype=np.uint8)
                xs.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
                ys.append(label)
        if not xs:
            raise FileNotFoundError(f"No images ({', '.join(self.IMAGE_SUFFIXES)}) under {root}.")
        return np.stack(xs), np.asarray(ys, dtype=np.int64), classes

    def load(self) -> tuple[TensorDataset, TensorDataset, TensorDataset]:
        root = self._root()
        fmt = self.format
        if fmt == "auto":
            fmt = "cifar10" if (root / "data_batch_1").exists() else "imagefolder"
        test: Optional[tuple[np.ndarray, np.ndarray]] = None
        val: Optional[tuple[np.ndarray, np.ndarray]] = None
        if fmt == "cifar10":
            x, y, test = self._load_cifar(root)
            if self.channels == 1:
                x = x.mean(1, keepdims=True).astype(np.uint8)
                test = (test[0].mean(1, keepdims=True).astype(np.uint8), test[1]) if test else None
            if tuple(x.shape[2:]) != self.image_size:
                raise ValueError(
                    f"CIFAR-10 images are 32x32; set data.image_size=[32,32] (got {list(self.image_size)})."
                )
        elif (root / "train").is_dir():
            x, y, self.class_names = self._read_tree(root / "train")
            if (root / "test").is_dir():
                test = self._read_tree(root / "test", self.class_names)[:2]
            if (root / "val").is_dir():
                val = self._read_tree(root / "val", self.class_names)[:2]
        else:
            x, y, self.class_names = self._read_tree(root)
        if self.num_classes is None:
            self.num_classes = int(max(y.max(), test[1].max() if test else 0)) + 1

        val_fraction = self.val_fraction
        if test is None:
            x, xt, y, yt = _train_test_split(x, y, self.test_fraction, self.split_seed)
            test = (xt, yt)
            val_fraction = self.val_fraction / (1.0 - self.test_fraction)  # a fraction of the whole folder
        if val is None:
            x, xv, y, yv = _train_test_split(x, y, val_fraction, self.split_seed)
            val = (xv, yv)
        xf = x.astype(np.float32) / 255.0
        mean = xf.mean(axis=(0, 2, 3), keepdims=True)
        std = xf.std(axis=(0, 2, 3), keepdims=True) + 1e-6

        def ds(a: np.ndarray, b: np.ndarray) -> TensorDataset:
            a = (a.astype(np.float32) / 255.0 - mean) / std
            return TensorDataset(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.int64))

        return ds(x, y), ds(*val), ds(*test)
