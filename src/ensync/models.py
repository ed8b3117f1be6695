"""Typed values of the SDK's public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Message", "ReplayInfo"]


@dataclass(frozen=True, slots=True)
class ReplayInfo:
    """What a replay says about the message it returned."""

    is_replayed: bool
    replay_timestamp: int | None
    was_acknowledged: bool


@dataclass(frozen=True, slots=True)
class Message:
    """A received (decrypted) message.

    Attributes:
        message_name: e.g. ``"orders/status/updated"``.
        idem: the message's unique id; pass it to ack, defer, discard, replay.
        block: its sequence number in the (recipient, name) partition.
        payload: the decrypted JSON payload.
        timestamp: epoch milliseconds: when the engine logged it if the
            transport says, else when it was received.
        metadata: the publisher's metadata (``persist``, ``headers``, ...).
        sender: the publishing app's id; publish to it to reply.
        replay_info: set on messages returned by ``replay``.
        attempt: which delivery of this message this is (1 = the first; 0
            for a copy from `EnSyncClient.observe`, which is no delivery).
    """

    message_name: str
    idem: str
    block: int
    payload: Any
    timestamp: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    sender: str = ""
    replay_info: ReplayInfo | None = None
    attempt: int = 1

    @property
    def headers(self) -> dict[str, Any]:
        """The publisher's headers (``metadata["headers"]``), ``{}`` if none."""
        headers = self.metadata.get("headers")
        return headers if isinstance(headers, dict) else {}
