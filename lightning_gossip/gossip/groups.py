"""The process groups gossip's messages travel on, apart from the training's collectives.

Gossip's point-to-point messages never share a group with the collectives of training (Lightning's, the user's, the
averager's own consensus): each exchange creates a group of its own over the gossiping ranks. A rank's messages
then never take a tag or a sequence number that a collective expects, and ``TORCH_DISTRIBUTED_DEBUG=DETAIL`` (which
compares every collective's sequence number across ranks) keeps working while ranks send different numbers of
messages. Every rank of the gossip group must create it at the same point (the exchanges are built together).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

_DEFAULT_TIMEOUT = timedelta(minutes=30)


def process_group_timeout(group: Optional[dist.ProcessGroup] = None) -> timedelta:
    """The timeout ``group`` (default: the default group) was created with, or torch's default if unknown."""
    group = group if group is not None else dist.distributed_c10d._get_default_group()
    for device in ("cpu", "cuda"):
        try:
            return group._get_backend(torch.device(device)).options._timeout
        except Exception:  # noqa: BLE001 - no backend for this device, or an API without options
            continue
    return _DEFAULT_TIMEOUT


def group_ranks(group: Optional[dist.ProcessGroup]) -> list[int]:
    """The global ranks of ``group`` (default: every rank), in group-rank order."""
    return dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))


def message_group(
    group: Optional[dist.ProcessGroup], timeout: Optional[timedelta] = None, backend: Optional[str] = None
) -> dist.ProcessGroup:
    """A new group over the ranks of ``group`` for gossip messages, with ``group``'s timeout unless ``timeout`` is
    given and its backend unless ``backend`` is. Inside a subgroup only its ranks take part in creating it."""
    return dist.new_group(
        group_ranks(group),
        backend=backend,
        timeout=timeout if timeout is not None else process_group_timeout(group),
        use_local_synchronization=group is not None,
    )
