"""Small classifiers for gossip experiments: the networks, and one LightningModule that trains any of them.

The LightningModule follows the lightning-hydra-template: the network, the optimizer and the scheduler come in
from the config (``net`` instantiated, ``optimizer``/``scheduler`` as ``_partial_`` callables), and metrics are
torchmetrics objects logged as ``train/loss``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best``,
``test/loss``, ``test/acc``. Metric objects synchronise their counts over all ranks when computed at epoch end, so
with several workers the epoch values cover every worker's samples (under gossip, validation and test see the
consensus model by default, so ``val/acc`` and ``test/acc`` are the consensus model's accuracy).

Nothing here knows about gossip: the same module trains with ``ddp``, ``single`` or ``gossip``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy


# ---------------------------------------------------------------------------------------------------------------------
# networks
# ---------------------------------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """Flatten, then ``hidden`` fully connected ReLU layers (optional BatchNorm and dropout), then the classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, hidden: Sequence[int] = (128, 64),
                 dropout: float = 0.0, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(int(s) for s in input_shape)
        for h in hidden:
            layers.append(nn.Linear(width, int(h)))
            if batch_norm:
                layers.append(nn.BatchNorm1d(int(h)))
            layers.append(nn.ReLU(inplace=True))
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two or more conv(3x3)-[BN]-ReLU-maxpool(2) stages, then a hidden fully connected layer and the classifier."""

    def __init__(self, input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32),
                 hidden: int = 64, batch_norm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"SmallCNN needs input_shape [C, H, W], got {list(input_shape)}.")
        in_ch, height, width = (int(s) for s in input_shape)
        layers: list[nn.Module] = []
        for ch in channels:
            layers.append(nn.Conv2d(in_ch, int(ch), 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(int(ch)))
            layers.append(nn.ReLU(inplace=True))
            if min(height, width) >= 2:
                layers.append(nn.MaxPool2d(2))
                height, width = height // 2, width // 2
            in_ch = int(ch)
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(in_ch * height * width, hidden), nn.ReLU(inplace=True),
            nn.Dropout(dropout) if dropout else nn.Identity(), nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-BN, identity shortcut (1x1 conv-BN projection when the shape changes)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, section 4.2): depth 6n+2, three stages of widths w, 2w, 4w.

    ``depth=20, width=16`` is ResNet-20 (0.27 M parameters); every conv is followed by BatchNorm, whose running
    statistics are buffers that gossip mixes too (``mix_buffers=True``).
    """

    def __init__(self, input_shape: Sequence[int], num_classes: int, depth: int = 20, width: int = 16) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"ResNet depth must be 6n+2 (8, 14, 20, 32, 44, 56, ...), got {depth}.")
        if len(input_shape) != 3:
            raise ValueError(f"ResNet needs input_shape [C, H, W], got {list(input_shape)}.")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(int(input_shape[0]), width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        in_ch = width
        for stage, out_ch in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                blocks.append(BasicBlock(in_ch, out_ch, stride=2 if (stage > 0 and i == 0) else 1))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_ch, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


# ---------------------------------------------------------------------------------------------------------------------
# the LightningModule
# ---------------------------------------------------------------------------------------------------------------------
def _default_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1)


def factory_as_config(factory: Any) -> Any:
    """A ``functools.partial``-like factory (Hydra's ``_partial_: true``) as plain data: ``{"_target_": ...,
    "_partial_": True, **keywords}``.

    Checkpoints store the module's hyper-parameters, and ``torch.load(weights_only=True)`` (Lightning's default when
    resuming) only reads plain data: a Hydra partial object in them makes every resume fail with UnpicklingError.
    """
    if factory is None or isinstance(factory, (dict, str)):
        return factory
    func = getattr(factory, "func", factory)
    target = f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}"
    config: dict[str, Any] = {"_target_": target, "_partial_": True}
    config.update({k: _plain(v) for k, v in (getattr(factory, "keywords", None) or {}).items()})
    if getattr(factory, "args", None):
        config["_args_"] = [_plain(a) for a in factory.args]
    return config


def _plain(value: Any) -> Any:
    """Config values as Python builtins (OmegaConf containers and tuples included); anything else as its repr."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - the app always has omegaconf
        pass
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return repr(value)


def factory_from_config(factory: Any) -> Any:
    """The reverse of :func:`factory_as_config`: a ``{"_target_": ..., "_partial_": True}`` mapping becomes the
    callable again (load_from_checkpoint passes the stored hyper-parameters back to ``__init__``)."""
    if isinstance(factory, Mapping) and "_target_" in factory:
        from hydra.utils import instantiate

        return instantiate(dict(factory, _partial_=True))
    return factory


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classification of any ``net``; optimizer/scheduler are partials from the config.

    Args:
        net: the network (``nn.Module``).
        optimizer: ``params -> Optimizer`` (a ``_partial_: true`` optimizer config).
        scheduler: ``optimizer -> LRScheduler`` or None.
        num_classes: for the accuracy metrics.
        scheduler_interval: ``"epoch"`` or ``"step"``.
    """

    def __init__(self, net: nn.Module, optimizer: Optional[Callable[..., torch.optim.Optimizer]] = None,
                 scheduler: Optional[Callable[..., Any]] = None, num_classes: int = 10,
                 scheduler_interval: str = "epoch") -> None:
        super().__init__()
        self.save_hyperparameters(logger=False, ignore=["net"])
        # stored as plain data, so that checkpoints load with weights_only=True
        self.hparams["optimizer"] = factory_as_config(optimizer)
        self.hparams["scheduler"] = factory_as_config(scheduler)
        self.net = net
        self.optimizer_factory = factory_from_config(optimizer) or _default_optimizer
        self.scheduler_factory = factory_from_config(scheduler)
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_acc_best = MaxMetric(sync_on_compute=False)  # fed synced values already

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _shared_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits.argmax(dim=1), y

    def on_train_start(self) -> None:
        # the sanity check's validation must not count as the best
        self.val_acc_best.reset()

    # Metric objects are updated per batch and computed in the *_epoch_end hooks, which every rank runs in the same
    # order: compute() is a collective (it syncs the counts over ranks), so it must not be left to Lightning's lazy
    # evaluation, which the progress bar triggers on rank 0 alone. The computed values are equal on every rank, so
    # they are logged without sync_dist: logging adds no collective of its own.
    def _log_epoch(self, stage: str, loss: MeanMetric, acc: MulticlassAccuracy, prog_bar: bool = False) -> None:
        values = {f"{stage}/loss": loss.compute(), f"{stage}/acc": acc.compute()}
        loss.reset()
        acc.reset()
        self.log_dict(values, prog_bar=prog_bar, sync_dist=False)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, preds, y = self._shared_step(batch)
        self.train_loss.update(loss.detach(), weight=y.numel())
        self.train_acc.update(preds, y)
        self.log("loss", loss.detach(), on_step=True, on_epoch=False, prog_bar=True, logger=False)
        return loss

    def on_train_epoch_end(self) -> None:
        self._log_epoch("train", self.train_loss, self.train_acc)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, y = self._shared_step(batch)
        self.val_loss.update(loss, weight=y.numel())
        self.val_acc.update(preds, y)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self._log_epoch("val", self.val_loss, self.val_acc, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
        best = self.val_acc_best.compute() if self.val_acc_best.update_count else acc
        self.log("val/acc_best", best, sync_dist=False)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        loss, preds, y = self._shared_step(batch)
        self.test_loss.update(loss, weight=y.numel())
        self.test_acc.update(preds, y)

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test", self.test_loss, self.test_acc)

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": self.hparams.scheduler_interval}}
