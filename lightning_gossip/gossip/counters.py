"""What a rank's exchange has moved: messages and bytes, rejected messages, skipped pushes, gossip steps taken."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class GossipCounters:
    """What one rank has moved. Bytes count whole messages (header and payload), as they cross the wire."""

    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    messages_rejected: int = 0
    # Asynchronous mode only: pushes the coin asked for but not sent, because this rank's previous push(es) had not
    # been taken by their receiver yet (``AsyncGossipExchange.max_sends_in_flight``). Lock-step never skips.
    sends_skipped: int = 0
    steps: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
