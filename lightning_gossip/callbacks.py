"""Observability for gossip runs: the strategy's counters and the consensus distance, logged under ``gossip/``."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class GossipMonitor(Callback):
    """Logs this rank's gossip weight, messages and bytes every step, and the consensus distance every epoch.

    The per-step values are those of the logging rank (rank 0), as Lightning logs them; ``gossip/consensus_distance``
    is (1/M) sum_i ||x_i - x_bar||^2 over all ranks, computed with a collective at the end of each training epoch
    (before the final consensus of ``fit``). :class:`~lightning_gossip.GossipStrategy` adds one automatically.
    """

    def __init__(self, log_consensus_distance: bool = True) -> None:
        self.log_consensus_distance = log_consensus_distance

    @staticmethod
    def _gossip_strategy(trainer: "pl.Trainer") -> Any:
        from lightning_gossip.strategy import GossipStrategy

        strategy = trainer.strategy
        return strategy if isinstance(strategy, GossipStrategy) and strategy.averager is not None else None

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", *args: Any) -> None:
        strategy = self._gossip_strategy(trainer)
        if strategy is None:
            return
        counters = strategy.counters
        metrics = {
            "gossip/weight": strategy.gossip_weight,
            "gossip/messages_sent": float(counters.messages_sent),
            "gossip/messages_received": float(counters.messages_received),
            "gossip/bytes_sent": float(counters.bytes_sent),
            "gossip/bytes_received": float(counters.bytes_received),
            "gossip/messages_rejected": float(counters.messages_rejected),
        }
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        strategy = self._gossip_strategy(trainer)
        if strategy is None or not self.log_consensus_distance or strategy.world_size == 1:
            return
        distance = strategy.averager.consensus_distance()  # a collective: this hook runs on every rank
        # Identical on every rank already; sync_dist only keeps Lightning's epoch-level bookkeeping consistent.
        pl_module.log("gossip/consensus_distance", distance, on_step=False, on_epoch=True, sync_dist=True)
