"""Your own images from a local path (``data=image_folder``): an ImageFolder tree or CIFAR-10 python batches."""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import TensorDataset

from lightning_gossip.app.data.holdout import train_test_split
from lightning_gossip.app.data.module import ShardedDataModule


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
            x, xt, y, yt = train_test_split(x, y, self.test_fraction, self.split_seed)
            test = (xt, yt)
            val_fraction = self.val_fraction / (1.0 - self.test_fraction)  # a fraction of the whole folder
        if val is None:
            x, xv, y, yv = train_test_split(x, y, val_fraction, self.split_seed)
            val = (xv, yv)
        xf = x.astype(np.float32) / 255.0
        mean = xf.mean(axis=(0, 2, 3), keepdims=True)
        std = xf.std(axis=(0, 2, 3), keepdims=True) + 1e-6

        def ds(a: np.ndarray, b: np.ndarray) -> TensorDataset:
            a = (a.astype(np.float32) / 255.0 - mean) / std
            return TensorDataset(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.int64))

        return ds(x, y), ds(*val), ds(*test)
