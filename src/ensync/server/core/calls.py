"""The calls transports make to the engine's operations, as values.

Each is immutable and made of plain values (text and numbers), so a call can
be handed over by reference in one process or serialised to another node
(the owner of the message's partition). The operations take them in
batches: :mod:`ensync.server.runtime.operations`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "Observe",
    "Pause",
    "Publish",
    "Replay",
    "Resume",
    "Settle",
    "SettleKind",
    "Subscribe",
    "Unsubscribe",
]


@dataclass(frozen=True, slots=True)
class Publish:
    """Store a message for one recipient app; answered with its idem."""

    client_id: str
    name: str
    payload: str
    recipient: str
    metadata: str
    payload_metadata: str | None = None


class SettleKind(enum.Enum):
    """What a settlement does with a message in flight (or pending)."""

    ACK = "ack"  # done; kept for replay
    DEFER = "defer"  # invisible for ``delay_ms``, then delivered again
    DISCARD = "discard"  # never delivered again; to the dead letters
    EXTEND = "extend"  # the ack deadline moves out by one lease
    RELEASE = "release"  # given back unsettled (the handler failed)


@dataclass(frozen=True, slots=True)
class Settle:
    """Settle one message of the caller's app, found by its idem.

    ``name`` is optional: official clients send none with some verbs
    (PROTOCOL.md §2.3, §3.3). Answered with a time for ``DEFER`` (when it is
    visible again), ``EXTEND`` (the new deadline) and ``RELEASE`` (when it is
    delivered again, ``None`` if it was dead-lettered); ``None`` otherwise.
    """

    client_id: str
    idem: str
    kind: SettleKind = SettleKind.ACK
    name: str | None = None
    delay_ms: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """Deliver messages of ``name`` to this client from now on."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """No more deliveries of ``name`` to this client."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Pause:
    """No new deliveries of ``name`` to this client; its unsettled ones go back."""

    client_id: str
    name: str
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Resume:
    """Undo a :class:`Pause`."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Replay:
    """Read back any message addressed to the caller's app."""

    client_id: str
    idem: str
    name: str | None = None


@dataclass(frozen=True, slots=True)
class Observe:
    """Copy the app's new messages matching ``pattern`` to the caller, without
    taking them (``stop``: end that)."""

    client_id: str
    pattern: str
    stop: bool = False
