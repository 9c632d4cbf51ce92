"""Observability for gossip runs: the averager's counters and the consensus distance, logged under ``gossip/``."""

from __future__ import annotations

from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from lightning_gossip._lightning_compat import last_batch_of_epoch
from lightning_gossip.gossip import GossipAverager


class GossipMonitor(Callback):
    """Logs this rank's gossip weight, messages and bytes every step, and the consensus distance every epoch.

    The per-step values are those of the logging rank (rank 0), as Lightning logs them; ``gossip/consensus_distance``
    is (1/M) sum_i ||x_i - x_bar||^2 over all ranks, computed with a collective at the last batch of each training epoch
    (before the final consensus of ``fit``). :class:`~lightning_gossip.GossipStrategy` adds one automatically; with
    any other strategy it logs nothing.
    """

    def __init__(self, log_consensus_distance: bool = True) -> None:
        self.log_consensus_distance = log_consensus_distance

    @staticmethod
    def _averager(trainer: "pl.Trainer") -> Optional[GossipAverager]:
        averager = getattr(trainer.strategy, "averager", None)
        return averager if isinstance(averager, GossipAverager) else None

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        averager = self._averager(trainer)
        if averager is None:
            return
        counters = averager.counters
        metrics = {
            "gossip/weight": averager.weight,
            "gossip/messages_sent": float(counters.messages_sent),
            "gossip/messages_received": float(counters.messages_received),
            "gossip/bytes_sent": float(counters.bytes_sent),
            "gossip/bytes_received": float(counters.bytes_received),
            "gossip/messages_rejected": float(counters.messages_rejected),
            "gossip/sends_skipped": float(counters.sends_skipped),
        }
        if self.log_consensus_distance and averager.world_size > 1 and last_batch_of_epoch(trainer):
            # A collective, run here on every rank at the same step. Not in on_train_epoch_end: there Lightning's
            # progress bar computes epoch metrics (e.g. torchmetrics syncs) on rank 0 only, and two collectives in
            # different orders on different ranks deadlock. The value is already global, so it is logged as a step
            # value, with no epoch-level reduction.
            metrics["gossip/consensus_distance"] = averager.consensus_distance()
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)
