"""What the benchmark harness and its workers share: the model, the synthetic data set and evaluation.

Plain torch only (no Lightning), so the harness can evaluate the workers' snapshots without importing Lightning.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

# Full mode: a ~1.06M-parameter MLP (the issue's "model of about 1M parameters"); 18 tensors, so the "one message per
# tensor" variant has something to lose. Quick mode: the same architecture, tiny.
MODEL_FULL = {"in_dim": 512, "hidden": 512, "blocks": 3, "classes": 10}
MODEL_QUICK = {"in_dim": 32, "hidden": 32, "blocks": 1, "classes": 10}
DATA_FULL = {"n_train": 16384, "n_test": 4096, "clusters_per_class": 4, "scale": 0.3, "seed": 0}
DATA_QUICK = {"n_train": 4096, "n_test": 1024, "clusters_per_class": 2, "scale": 0.6, "seed": 0}


def make_model(cfg: dict[str, int]) -> nn.Sequential:
    """An MLP: Linear, then ``blocks`` x (LayerNorm, ReLU, Linear hidden->hidden), then LayerNorm, ReLU, Linear."""
    layers: list[nn.Module] = [nn.Linear(cfg["in_dim"], cfg["hidden"])]
    for _ in range(cfg["blocks"]):
        layers += [nn.LayerNorm(cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], cfg["hidden"])]
    layers += [nn.LayerNorm(cfg["hidden"]), nn.ReLU(), nn.Linear(cfg["hidden"], cfg["classes"])]
    return nn.Sequential(*layers)


def num_params(cfg: dict[str, int]) -> int:
    return sum(p.numel() for p in make_model(cfg).parameters())


def make_data(model_cfg: dict[str, int], data_cfg: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    """A synthetic classification set generated in-process (no download), identical in every process.

    Each class is a mixture of ``clusters_per_class`` Gaussian clusters in ``in_dim`` dimensions (centres drawn with
    std ``scale``, unit noise), so it is not linearly separable and accuracy climbs over a few hundred steps.
    Returns (x_train, y_train, x_test, y_test).
    """
    d, c, k = model_cfg["in_dim"], model_cfg["classes"], int(data_cfg["clusters_per_class"])
    g = torch.Generator().manual_seed(int(data_cfg["seed"]))
    centres = torch.randn(c * k, d, generator=g) * float(data_cfg["scale"])
    n = int(data_cfg["n_train"]) + int(data_cfg["n_test"])
    cluster = torch.randint(0, c * k, (n,), generator=g)
    x = centres[cluster] + torch.randn(n, d, generator=g)
    y = cluster % c
    n_train = int(data_cfg["n_train"])
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 2048) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(y), batch):
        correct += int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
    return correct / len(y)


def load_flat(model: nn.Module, flat: torch.Tensor) -> nn.Module:
    torch.nn.utils.vector_to_parameters(flat.to(torch.float32), model.parameters())
    return model


def weighted_consensus(flats: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """x_bar = sum_i a_i x_i / sum_i a_i (float64 accumulation)."""
    total = sum(weights)
    acc = torch.zeros_like(flats[0], dtype=torch.float64)
    for flat, weight in zip(flats, weights):
        acc.add_(flat.to(torch.float64), alpha=weight)
    return acc.div_(total).to(torch.float32)
