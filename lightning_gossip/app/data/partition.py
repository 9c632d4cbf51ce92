"""Which worker holds which training samples under label skew: a fixed non-IID partition, the same on every rank."""

from __future__ import annotations

from typing import Optional

import numpy as np

# how the training set is cut over the workers: the same distribution everywhere, or a label-skewed partition
SPLITS = ("iid", "label_skew")


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
