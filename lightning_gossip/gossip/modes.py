"""The two gossip modes, as peers: which exchange moves a run's messages.

* lock-step (:class:`~lightning_gossip.gossip.exchange.GossipExchange`): who sends to whom at step t is a pure
  function of (seed, t); every transfer is a rendezvous of two ranks at the same step, so ranks must take the same
  number of steps; deterministic, exactly resumable, NCCL-friendly; bounded staleness and periodic global averages.
* asynchronous (:class:`~lightning_gossip.gossip.async_exchange.AsyncGossipExchange`): GoSGD as published; a rank
  pushes whenever its coin says so and mixes whatever has arrived; nobody waits for anybody during training, ranks
  take as many steps as their speed allows, and consistent cuts are reached by quiescence.

Everything that differs between them is behind the exchange protocol (``equal_steps``, ``cut()``, ``abort()``, see
:class:`~lightning_gossip.gossip.exchange.Exchange`); the averager and the adapters never ask which mode they run.
"""

from __future__ import annotations

from typing import Any, Callable

from lightning_gossip.gossip.options import GossipOptions


def exchange_for(options: GossipOptions) -> Callable[..., Any]:
    """The exchange class of ``options.mode``: a factory ``(state, options, group, schedule) -> exchange``."""
    if options.mode == "asynchronous":
        from lightning_gossip.gossip.async_exchange import AsyncGossipExchange

        return AsyncGossipExchange
    from lightning_gossip.gossip.exchange import GossipExchange

    return GossipExchange
