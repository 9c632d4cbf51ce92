"""TEMPORARY (before the architecture refactor lands): asynchronous mode wired through subclasses, for testing."""

from __future__ import annotations

from typing import Any

import torch

from lightning_gossip import async_support
from lightning_gossip.gossip.async_exchange import AsyncGossipExchange
from lightning_gossip.gossip.averager import GossipAverager
from lightning_gossip.strategy import GossipStrategy


class AsyncAverager(GossipAverager):
    def __init__(self, module, **kwargs) -> None:
        super().__init__(module, **kwargs)
        self.exchange = AsyncGossipExchange(self.state, None, None, self.schedule, on_nonfinite="warn")

    def step(self) -> None:
        self.exchange.step(self.step_count)
        self.step_count += 1

    def finish(self) -> None:
        self.exchange.drain()

    def _mean(self):
        self.exchange.drain()
        return self.state.weighted_mean(on_nonfinite="warn")

    def in_flight_weight(self) -> float:
        return self.exchange.in_flight_weight()


class AsyncStrategy(GossipStrategy):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_training_step = False

    def _setup_averager(self) -> None:
        resume, self._resume_state = self._resume_state, None
        self.averager = AsyncAverager(
            self.lightning_module, p=self.p, topology=self.topology, seed=async_support.seed_of(self),
            mix_buffers=self.mix_buffers, broadcast=resume is None,
        )
        if resume is not None:
            self.averager.load_state_dict(resume)

    def _check_before_launch(self, trainer) -> None:
        if trainer is not None and trainer.state.fn == "fit":
            async_support.check_trainer(trainer)
        super()._check_before_launch(trainer)

    def setup(self, trainer) -> None:
        super().setup(trainer)
        if trainer.training or trainer.state.fn == "fit":
            async_support.setup_fit(self, trainer)

    def process_dataloader(self, dataloader):
        return async_support.process_dataloader(self, super().process_dataloader(dataloader))

    def training_step(self, *args, **kwargs):
        self._in_training_step = True
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._in_training_step = False

    def reduce(self, *args, **kwargs):
        if self._in_training_step:
            async_support.refuse_step_collective("A reduction (self.log(..., sync_dist=True) on step)")
        return super().reduce(*args, **kwargs)

    def on_train_end(self) -> None:
        if self.averager is None or self.world_size == 1:
            return
        if self.final_consensus:
            self.averager.consensus_()
        else:
            self.averager.finish()
        self.averager.exchange.close()

    def save_checkpoint(self, checkpoint, filepath, storage_options=None) -> None:
        if self.averager is not None and self.world_size > 1 and torch.distributed.is_initialized():
            self.averager.finish()
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def teardown(self) -> None:
        if self.averager is not None:
            self.averager.exchange.close()
        super().teardown()

    def on_exception(self, exception) -> None:
        if self.averager is not None:
            self.averager.exchange.close(clean=False)
        super().on_exception(exception)
