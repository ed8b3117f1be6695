"""The requests of the WebSocket text protocol (PROTOCOL.md §3.3), as values.

:mod:`ensync.protocol.wscodec` parses and writes them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TypeAlias

__all__ = [
    "MAX_REASON_LENGTH",
    "Ack",
    "Conn",
    "Continue",
    "Defer",
    "Discard",
    "Extend",
    "Malformed",
    "Pause",
    "Pong",
    "Pub",
    "Replay",
    "Request",
    "Rollback",
    "Sub",
    "Unsub",
    "int_or_none",
    "malformed",
    "show",
]

MAX_REASON_LENGTH = 200
"""Upper bound on ``Malformed.reason``: it is echoed to the peer in ``-FAIL:``."""


@dataclass(frozen=True, slots=True)
class Conn:
    """``CONN``: authenticate the socket with an app key."""

    access_key: str


@dataclass(frozen=True, slots=True)
class Pub:
    """``PUB``: publish one message to one recipient app id."""

    client_id: str
    name: str
    payload: str
    delivery_to: str
    metadata: str
    payload_metadata: str | None  # None: the key was absent (N-ws-0018, P-ws)


@dataclass(frozen=True, slots=True)
class Sub:
    """``SUB``: start deliveries of ``name`` to this client."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Unsub:
    """``UNSUB``: stop deliveries of ``name`` to this client."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Ack:
    """``ACK``: acknowledge a delivery; ``block`` and ``name`` are hints (§7.10).

    ``block`` is None when BLOCK is missing or not a decimal integer; ``name``
    may be ``"undefined"`` (N-ws-0018 auto-ack) or ``""``.
    """

    client_id: str
    idem: str
    block: int | None
    name: str


@dataclass(frozen=True, slots=True)
class Rollback:
    """``ROLLBACK``: give a delivery back (BLOCK, or PARTITION_BLOCK from G-ws)."""

    client_id: str
    idem: str
    block: int | None
    # ensync extension: why the message is given back (official clients send none).
    reason: str = ""


@dataclass(frozen=True, slots=True)
class Defer:
    """``DEFER``: redeliver after ``delay_ms`` (any integer; the engine checks range)."""

    client_id: str
    idem: str
    name: str
    delay_ms: int
    reason: str


@dataclass(frozen=True, slots=True)
class Discard:
    """``DISCARD``: never deliver the message again."""

    client_id: str
    idem: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Replay:
    """``REPLAY``: send the message again as ``+REPLAY:<record>``."""

    client_id: str
    idem: str
    name: str


@dataclass(frozen=True, slots=True)
class Pause:
    """``PAUSE``: hold deliveries of ``name`` to this client."""

    client_id: str
    name: str
    reason: str


@dataclass(frozen=True, slots=True)
class Continue:
    """``CONTINUE``: resume deliveries of ``name`` to this client."""

    client_id: str
    name: str


@dataclass(frozen=True, slots=True)
class Extend:
    """``EXTEND``: our extension, extend a delivery's lease; official clients never send it."""

    client_id: str
    idem: str
    name: str


@dataclass(frozen=True, slots=True)
class Pong:
    """Bare ``PONG``: a client's answer to ``PING``; it gets no reply (§3.2, §3.8 rule 2)."""


Request: TypeAlias = (
    Conn
    | Pub
    | Sub
    | Unsub
    | Ack
    | Rollback
    | Defer
    | Discard
    | Replay
    | Pause
    | Continue
    | Extend
    | Pong
)


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame that could not be understood; ``reason`` says what is wrong (≤ 200 chars)."""

    reason: str


def malformed(reason: str) -> Malformed:
    if len(reason) > MAX_REASON_LENGTH:
        reason = reason[: MAX_REASON_LENGTH - 3] + "..."
    return Malformed(reason)


def show(value: str, limit: int = 40) -> str:
    """``value`` quoted for a reason, cut to ``limit`` characters (reasons stay short)."""
    if len(value) <= limit:
        return repr(value)
    return repr(value[:limit]) + "..."


_DECIMAL = re.compile(r"-?[0-9]+")


def int_or_none(text: str | None) -> int | None:
    """A decimal integer field's value, ``None`` if it is not one."""
    if text is None or _DECIMAL.fullmatch(text) is None:
        return None
    try:
        return int(text)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows
        return None
