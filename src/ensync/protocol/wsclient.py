"""The SDK's side of one WebSocket connection (PROTOCOL.md §3.8), sans-I/O.

Requests are numbered as they are sent, and replies matched to the oldest
pending one, as the official clients do (the protocol has no request id).
The engine's side is :mod:`ensync.protocol.wssession`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TypeAlias

from ensync.protocol.wscodec import (
    Delivered,
    Fail,
    Malformed,
    Pass,
    Ping,
    Pong,
    Record,
    Replayed,
    Request,
    format_request,
    parse_reply,
)
from ensync.protocol.wssession import LocalProtocolError, shorten

__all__ = [
    "ClientEvent",
    "ClientSession",
    "PingArrived",
    "RecordArrived",
    "ReplyFor",
    "Unexpected",
]


@dataclass(frozen=True, slots=True)
class ReplyFor:
    """The reply to the request :meth:`ClientSession.send` numbered ``seq``."""

    seq: int
    reply: Pass | Fail | Replayed


@dataclass(frozen=True, slots=True)
class RecordArrived:
    """A ``+RECORD:`` delivery."""

    record: Record


@dataclass(frozen=True, slots=True)
class PingArrived:
    """A text ``PING``: answer with ``send(Pong())``."""


@dataclass(frozen=True, slots=True)
class Unexpected:
    """A frame that fits nothing: unparseable, or a reply with no request pending."""

    text_excerpt: str
    reason: str


ClientEvent: TypeAlias = ReplyFor | RecordArrived | PingArrived | Unexpected


class ClientSession:
    """The SDK's side of one connection: numbers requests and matches replies to
    them oldest first, as the official clients do (§3.8).

    Call :meth:`send` and write the returned text; feed every received text
    frame to :meth:`receive_text` and act on the events; call :meth:`close`
    when the socket is gone to learn which requests will never be answered.
    """

    def __init__(self) -> None:
        self._next_seq = 1
        self._pending: deque[int] = deque()
        self._closed = False

    def send(self, request: Request) -> tuple[int | None, str]:
        """Number ``request`` and frame it: ``(seq, text)``; seq is None for
        ``Pong``, which gets no reply.

        Raises:
            ValueError: a value the frame cannot carry (:func:`format_request`).
            LocalProtocolError: the session is closed.
        """
        if self._closed:
            raise LocalProtocolError("send() after close()")
        text = format_request(request)
        if isinstance(request, Pong):
            return None, text
        seq = self._next_seq
        self._next_seq += 1
        self._pending.append(seq)
        return seq, text

    def receive_text(self, text: str) -> list[ClientEvent]:
        """Take one server text frame; return what it means. Never raises."""
        if self._closed:
            return []
        reply = parse_reply(text)
        if isinstance(reply, Malformed):
            return [Unexpected(shorten(text, 100), reply.reason)]
        if isinstance(reply, Delivered):
            return [RecordArrived(reply.record)]
        if isinstance(reply, Ping):
            return [PingArrived()]
        if not self._pending:
            return [Unexpected(shorten(text, 100), "a reply with no request outstanding")]
        return [ReplyFor(self._pending.popleft(), reply)]

    def receive_binary(self, data: bytes) -> list[ClientEvent]:
        """Take one binary frame, which no server sends: an :class:`Unexpected`."""
        if self._closed:
            return []
        return [Unexpected(f"<{len(data)} bytes>", "binary frame")]

    def outstanding(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._pending)

    def close(self) -> list[int]:
        """The socket is gone: return the seqs that will never be answered, oldest
        first. Later frames are ignored and :meth:`send` raises."""
        self._closed = True
        lost = list(self._pending)
        self._pending.clear()
        return lost
