"""GossipMonitor's collective must not collide with Lightning's rank-0-only metric computation."""

from datetime import timedelta

import lightning as L
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader

import lightning_gossip
from tests.lightning.scripts.fit_and_record import IndexedBlobs


class EpochMetricModule(L.LightningModule):
    """The lightning-hydra-template pattern: a torchmetrics object logged from training_step with on_epoch=True.

    The progress bar computes (and so syncs) that metric on rank 0 only at the end of the epoch; a collective of
    the monitor at the same hook used to deadlock against it.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(8, 3)
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=3)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        logits = self.net(x)
        self.train_acc(logits, y)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        return nn.functional.cross_entropy(logits, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_epoch_metrics_with_progress_bar_do_not_deadlock_and_distance_is_logged(tmp_path):
    torch.set_num_threads(1)
    strategy = lightning_gossip.GossipStrategy(p=0.5, start_method="fork", timeout=timedelta(seconds=60))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        max_epochs=2,
        logger=L.pytorch.loggers.CSVLogger(tmp_path),
        enable_progress_bar=True,
        enable_checkpointing=False,
        log_every_n_steps=1,
    )
    trainer.fit(EpochMetricModule(), DataLoader(IndexedBlobs(n=64), batch_size=8))
    metrics = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()
    header = metrics[0].split(",")
    column = header.index("gossip/consensus_distance")
    distances = [line.split(",")[column] for line in metrics[1:] if line.split(",")[column]]
    assert len(distances) == 2  # once per epoch, at its last batch
    assert all(float(d) >= 0.0 for d in distances)
    assert "train/acc" in header


class CountsSigtermAgreements(EpochMetricModule):
    def training_step(self, batch, batch_idx):
        agreement = self.trainer.strategy.mode.sigterm
        self.log("sigterm_agreements", float(agreement.syncs), on_step=True, on_epoch=False)
        return super().training_step(batch, batch_idx)


def test_sigterm_is_agreed_on_every_few_steps_not_every_step():
    torch.set_num_threads(1)
    strategy = lightning_gossip.GossipStrategy(
        p=0.5, start_method="fork", timeout=timedelta(seconds=60), sigterm_sync_every=3
    )
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, logger=False,
        enable_progress_bar=False, enable_checkpointing=False,
    )  # fmt: skip
    trainer.fit(CountsSigtermAgreements(), DataLoader(IndexedBlobs(n=64), batch_size=8))  # 4 steps per rank
    # Lightning would broadcast before each of the 4 steps; gossip agrees before steps 0 and 3 only (the value comes
    # back from rank 0's last training step through callback_metrics; one more runs at the epoch's last batch).
    assert trainer.callback_metrics["sigterm_agreements"].item() == 2.0
