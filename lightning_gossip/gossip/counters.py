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
    # ``on_peer_loss="continue"`` only: peers this rank has seen declared lost; pushes that failed because their
    # receiver was gone (their weight went back to this rank: such a message never left); messages from a lost peer
    # that arrived after this rank learned of the loss (dropped: their weight is counted as lost with the peer).
    peers_lost: int = 0
    sends_returned: int = 0
    messages_dropped_from_lost: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)
