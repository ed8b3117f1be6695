"""Per-connection state machines for the WebSocket text protocol (PROTOCOL.md §3).

:class:`ServerSession` is the engine's side of one socket; the SDK's is
:class:`ensync.protocol.wsclient.ClientSession`. Both are sans-I/O: frames
in, events and frames out; no sockets, clocks or tasks. A driver feeds
every received frame in, executes what comes back, and sends
``data_to_send()`` / the returned frame text.

No request id exists on this protocol: clients match each ``+PASS:`` /
``-FAIL:`` / ``+REPLAY:`` to their oldest pending request (§3.8). So the
server session keeps these invariants (the tests check each):

1. Every frame received while not CLOSED, except a bare ``PONG``, is a
   command and gets a *seq*: consecutive integers from 1, in arrival order.
2. Every seq gets exactly one reply frame, and reply frames are released to
   ``data_to_send()`` strictly in seq order, however the engine completes them.
3. No reply frame exists without a seq: none for ``PONG``, never an
   unsolicited ``+PASS:`` / ``-FAIL:`` / ``+REPLAY:`` (§3.8 rule 2).
4. A command other than CONN reaches the driver (as :class:`Incoming`) only
   in OPEN and only if its CLIENT_ID is the one bound by the accepted CONN.
5. At most one CONN is with the driver at a time; frames that arrive
   meanwhile wait, in order, until it is accepted or refused.
6. ``+RECORD:`` and ``PING`` frames are queued at once: they may fall between
   replies (§3.8 rule 3) but never reorder them.

Which action each (state, event) pair takes is data: :data:`SERVER_TRANSITIONS`.
A pair with no row is a driver bug and raises :class:`LocalProtocolError`.
Every frame event has a row in every state where it can occur (a foreign
CLIENT_ID needs a bound one), so peer input never raises.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ensync.protocol.wscodec import (
    Conn,
    Delivered,
    Fail,
    Malformed,
    Pass,
    Ping,
    Pong,
    Record,
    Replayed,
    Request,
    format_conn_pass,
    format_reply,
    parse_request,
)

__all__ = [
    "SERVER_TRANSITIONS",
    "Incoming",
    "LocalProtocolError",
    "ServerAction",
    "ServerEvent",
    "ServerSession",
    "ServerSessionStatistics",
    "ServerState",
    "Transition",
    "shorten",
]


class LocalProtocolError(Exception):
    """Our own code misused a session (a driver bug: a second reply, an unknown
    seq, a record pushed before CONN). Never caused by the peer, whose mistakes
    become ``-FAIL:`` replies or :class:`Unexpected` events."""


class ServerState(enum.Enum):
    """Where one server-side socket stands."""

    AWAITING_CONN = "awaiting CONN"  # also after a refused CONN (§3.6: socket stays open)
    CONNECTING = "CONN with the engine"
    OPEN = "open"
    CLOSED = "closed"


class ServerEvent(enum.Enum):
    """What can happen to a server session: frames from the peer, calls from the driver."""

    # frames
    CONN = "CONN frame"
    COMMAND = "command frame (with the bound CLIENT_ID, if one is bound)"
    FOREIGN_COMMAND = "command frame with another CLIENT_ID"
    MALFORMED = "unparseable text frame"
    BINARY = "binary frame"
    PONG = "PONG frame"
    # driver calls
    CONN_ACCEPTED = "conn_accepted()"
    CONN_REFUSED = "conn_refused()"
    REPLY = "reply()"
    PUSH = "push()"
    PING = "send_ping()"
    CLOSE = "close()"


class ServerAction(enum.Enum):
    """What the session does for an event."""

    EXECUTE = "hand the command to the driver"
    BUFFER = "hold the command until the pending CONN is decided"
    IGNORE = "do nothing"
    FAIL_MALFORMED = "reply -FAIL: naming what is wrong"
    FAIL_BINARY = "reply -FAIL: text frames only"
    FAIL_CONN_FIRST = "reply -FAIL: send CONN first"
    FAIL_ALREADY_CONNECTED = "reply -FAIL: already connected"
    FAIL_FOREIGN_CLIENT = "reply -FAIL: CLIENT_ID is not this connection's"
    ACCEPT = "reply +PASS:{clientId=..., clientHash=...}, bind, run held commands"
    REFUSE = "reply -FAIL:<reason>, run held commands"
    COMPLETE = "record the reply; release replies in seq order"
    SEND = "queue the frame now"
    CLOSE = "forget pending work"


@dataclass(frozen=True, slots=True)
class Transition:
    """One row of :data:`SERVER_TRANSITIONS`."""

    action: ServerAction
    next_state: ServerState


_S, _E, _A = ServerState, ServerEvent, ServerAction


def _row(action: ServerAction, next_state: ServerState) -> Transition:
    return Transition(action, next_state)


SERVER_TRANSITIONS: Mapping[tuple[ServerState, ServerEvent], Transition] = MappingProxyType(
    {
        # Before a successful CONN only CONN is executed (§3.6, §5 "unknown
        # client_id -> failure"); every other command still gets its reply.
        (_S.AWAITING_CONN, _E.CONN): _row(_A.EXECUTE, _S.CONNECTING),
        (_S.AWAITING_CONN, _E.COMMAND): _row(_A.FAIL_CONN_FIRST, _S.AWAITING_CONN),
        (_S.AWAITING_CONN, _E.MALFORMED): _row(_A.FAIL_MALFORMED, _S.AWAITING_CONN),
        (_S.AWAITING_CONN, _E.BINARY): _row(_A.FAIL_BINARY, _S.AWAITING_CONN),
        (_S.AWAITING_CONN, _E.PONG): _row(_A.IGNORE, _S.AWAITING_CONN),
        (_S.AWAITING_CONN, _E.PING): _row(_A.SEND, _S.AWAITING_CONN),
        (_S.AWAITING_CONN, _E.CLOSE): _row(_A.CLOSE, _S.CLOSED),
        # While the engine decides a CONN, whether a later CONN or command runs
        # depends on the outcome: hold them. Malformed and binary frames fail
        # either way; their replies still wait for the CONN's (seq order).
        (_S.CONNECTING, _E.CONN): _row(_A.BUFFER, _S.CONNECTING),
        (_S.CONNECTING, _E.COMMAND): _row(_A.BUFFER, _S.CONNECTING),
        (_S.CONNECTING, _E.MALFORMED): _row(_A.FAIL_MALFORMED, _S.CONNECTING),
        (_S.CONNECTING, _E.BINARY): _row(_A.FAIL_BINARY, _S.CONNECTING),
        (_S.CONNECTING, _E.PONG): _row(_A.IGNORE, _S.CONNECTING),
        (_S.CONNECTING, _E.CONN_ACCEPTED): _row(_A.ACCEPT, _S.OPEN),
        # §3.6/§7.18: a refused CONN leaves the socket open for another try.
        (_S.CONNECTING, _E.CONN_REFUSED): _row(_A.REFUSE, _S.AWAITING_CONN),
        (_S.CONNECTING, _E.PING): _row(_A.SEND, _S.CONNECTING),
        (_S.CONNECTING, _E.CLOSE): _row(_A.CLOSE, _S.CLOSED),
        # A client id is per connection (§1): one CONN per socket.
        (_S.OPEN, _E.CONN): _row(_A.FAIL_ALREADY_CONNECTED, _S.OPEN),
        (_S.OPEN, _E.COMMAND): _row(_A.EXECUTE, _S.OPEN),
        (_S.OPEN, _E.FOREIGN_COMMAND): _row(_A.FAIL_FOREIGN_CLIENT, _S.OPEN),
        (_S.OPEN, _E.MALFORMED): _row(_A.FAIL_MALFORMED, _S.OPEN),
        (_S.OPEN, _E.BINARY): _row(_A.FAIL_BINARY, _S.OPEN),
        (_S.OPEN, _E.PONG): _row(_A.IGNORE, _S.OPEN),
        (_S.OPEN, _E.REPLY): _row(_A.COMPLETE, _S.OPEN),
        (_S.OPEN, _E.PUSH): _row(_A.SEND, _S.OPEN),
        (_S.OPEN, _E.PING): _row(_A.SEND, _S.OPEN),
        (_S.OPEN, _E.CLOSE): _row(_A.CLOSE, _S.CLOSED),
        # The engine may finish work after the socket is gone: not a bug.
        **{(_S.CLOSED, event): _row(_A.IGNORE, _S.CLOSED) for event in ServerEvent},
    }
)
"""Every (state, event) pair the server session accepts, and what it does."""


@dataclass(frozen=True, slots=True)
class Incoming:
    """A command the driver must execute now, then answer with ``reply(seq, ...)``
    (for a CONN: ``conn_accepted(seq, ...)`` or ``conn_refused(seq, ...)``)."""

    seq: int
    request: Request


@dataclass(frozen=True, slots=True)
class ServerSessionStatistics:
    """Buffer sizes of one server session (anyio-style ``statistics()``)."""

    outstanding: int  # commands whose reply is not yet released
    executing: int  # handed to the driver, not yet answered
    buffered: int  # held behind a pending CONN
    frames_to_send: int  # released, not yet taken by data_to_send()


@dataclass(slots=True)
class _Slot:
    """Bookkeeping for one seq until its reply is released."""

    handed_out: bool = False
    frame: str | None = None
    on_sent: Callable[[], None] | None = None


class _Binary:
    """Stands for a binary frame in the event classification."""


_BINARY = _Binary()
_BINARY_REASON = "binary frames are not supported: send each command as a text frame"


def _word(request: Request) -> str:
    return type(request).__name__.upper()


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class ServerSession:
    """The engine's state machine for one WebSocket connection.

    Feed frames with :meth:`receive_text` / :meth:`receive_binary`; execute
    each returned :class:`Incoming`; answer it with :meth:`conn_accepted`,
    :meth:`conn_refused` or :meth:`reply` (in any order); queue deliveries
    with :meth:`push`; after each call, send :meth:`data_to_send` in order.
    Call :meth:`close` when the socket is gone.
    """

    def __init__(self) -> None:
        self._state = ServerState.AWAITING_CONN
        self._client_id: str | None = None
        self._next_seq = 1
        self._next_release = 1
        self._slots: dict[int, _Slot] = {}
        self._buffer: deque[tuple[int, Request]] = deque()
        self._conn_seq: int | None = None
        self._outgoing: list[str] = []

    @property
    def state(self) -> ServerState:
        """The current :class:`ServerState`."""
        return self._state

    @property
    def client_id(self) -> str | None:
        """The client id bound by the accepted CONN (kept after close), else None."""
        return self._client_id

    # -- frames from the peer -------------------------------------------------

    def receive_text(self, text: str) -> list[Incoming]:
        """Take one text frame; return the commands to execute now (maybe none).

        Malformed frames, commands before CONN, a second CONN, foreign
        CLIENT_IDs are answered here; ``PONG`` is dropped without a reply.
        Then call :meth:`data_to_send`.
        """
        parsed = parse_request(text)
        if isinstance(parsed, Malformed):
            return self._frame(ServerEvent.MALFORMED, None, parsed.reason, None)
        return self._frame(self._classify(parsed), parsed, "", None)

    def receive_binary(self, data: bytes) -> None:
        """Take one binary frame: a command in its own right, answered ``-FAIL:``
        (§3.1, §7.11: text frames only). Then call :meth:`data_to_send`."""
        del data  # never inspected
        self._frame(ServerEvent.BINARY, None, _BINARY_REASON, None)

    # -- calls from the driver ------------------------------------------------

    def conn_accepted(
        self,
        seq: int,
        client_id: str,
        client_hash: str,
        extra: Mapping[str, str] | None = None,
    ) -> list[Incoming]:
        """The engine accepted CONN ``seq``: reply ``+PASS:{clientId=..., clientHash=...}``,
        bind ``client_id``, and return the held commands that may now run.

        Does nothing (returns ``[]``) once CLOSED; the driver should then drop
        the client it just created.

        Raises:
            LocalProtocolError: ``seq`` is not the CONN being decided.
            ValueError: an id the CONN reply cannot carry (:func:`format_conn_pass`).
        """
        transition = self._lookup(ServerEvent.CONN_ACCEPTED)
        if transition.action is ServerAction.IGNORE:
            return []
        self._check_conn_seq(seq)
        text = format_conn_pass(client_id, client_hash, extra)
        self._state = transition.next_state
        self._client_id = client_id
        self._conn_seq = None
        self._answer(seq, "+PASS:" + text)
        incoming = self._drain()
        self._release()
        return incoming

    def conn_refused(self, seq: int, reason: str) -> list[Incoming]:
        """The engine refused CONN ``seq``: reply ``-FAIL:<reason>`` and go back to
        AWAITING_CONN with the socket open (§3.6). Held frames are then taken as
        if they had just arrived, so the result holds the next held CONN, if any
        (commands before it get "send CONN first").

        Raises:
            LocalProtocolError: ``seq`` is not the CONN being decided.
        """
        transition = self._lookup(ServerEvent.CONN_REFUSED)
        if transition.action is ServerAction.IGNORE:
            return []
        self._check_conn_seq(seq)
        self._state = transition.next_state
        self._conn_seq = None
        self._answer(seq, "-FAIL:" + reason)
        incoming = self._drain()
        self._release()
        return incoming

    def reply(
        self,
        seq: int,
        reply: Pass | Fail | Replayed,
        *,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        """Answer command ``seq``. The reply is released once every earlier seq is;
        ``on_sent`` runs right after it joins the outgoing frames (start pushing a
        name's records from the SUB reply's ``on_sent``: §3.8 rule 4). An
        exception from ``on_sent`` propagates after later ready replies are
        released. Does nothing once CLOSED.

        Raises:
            LocalProtocolError: ``seq`` is unknown, already answered or was
                never handed out (a CONN is decided with ``conn_accepted()`` /
                ``conn_refused()``); or ``reply`` is not a command's reply.
        """
        if not isinstance(reply, Pass | Fail | Replayed):
            raise LocalProtocolError(
                f"reply() takes Pass, Fail or Replayed, not {type(reply).__name__}: "
                "records go through push()"
            )
        transition = self._lookup(ServerEvent.REPLY)
        if transition.action is ServerAction.IGNORE:
            return
        slot = self._slots.get(seq)
        if slot is None:
            raise LocalProtocolError(f"seq {seq} is unknown or already answered")
        if not slot.handed_out:
            raise LocalProtocolError(f"seq {seq} was never handed out as Incoming")
        if slot.frame is not None:
            raise LocalProtocolError(f"seq {seq} is already answered")
        slot.frame = format_reply(reply)
        slot.on_sent = on_sent
        self._release()

    def push(self, record: Record) -> None:
        """Queue a ``+RECORD:`` delivery now (between replies is fine, §3.8 rule 3).
        Does nothing once CLOSED.

        Raises:
            LocalProtocolError: the connection is not open yet.
        """
        if self._lookup(ServerEvent.PUSH).action is ServerAction.SEND:
            self._outgoing.append(format_reply(Delivered(record)))

    def send_ping(self) -> None:
        """Queue a text ``PING`` (optional keep-alive, §3.9); the answer ``PONG``
        gets no reply. Does nothing once CLOSED."""
        if self._lookup(ServerEvent.PING).action is ServerAction.SEND:
            self._outgoing.append(format_reply(Ping()))

    def close(self) -> None:
        """The socket is gone: forget pending and held commands. Later frames,
        replies and pushes are ignored; frames already released stay in
        :meth:`data_to_send`."""
        transition = self._lookup(ServerEvent.CLOSE)
        self._state = transition.next_state
        self._slots.clear()
        self._buffer.clear()
        self._conn_seq = None

    def data_to_send(self) -> list[str]:
        """The text frames released since the last call, in the order to send them."""
        frames, self._outgoing = self._outgoing, []
        return frames

    def outstanding(self) -> int:
        """Commands received whose reply is not released yet (executing, held, or
        answered behind a slower one): cap pipelining with it."""
        return len(self._slots)

    def statistics(self) -> ServerSessionStatistics:
        """Current buffer sizes."""
        executing = sum(
            1 for slot in self._slots.values() if slot.handed_out and slot.frame is None
        )
        return ServerSessionStatistics(
            outstanding=len(self._slots),
            executing=executing,
            buffered=len(self._buffer),
            frames_to_send=len(self._outgoing),
        )

    # -- internals --------------------------------------------------------------

    def _lookup(self, event: ServerEvent) -> Transition:
        transition = SERVER_TRANSITIONS.get((self._state, event))
        if transition is None:
            raise LocalProtocolError(f"{event.value} is not allowed in state {self._state.name}")
        return transition

    def _classify(self, request: Request) -> ServerEvent:
        if isinstance(request, Pong):
            return ServerEvent.PONG
        if isinstance(request, Conn):
            return ServerEvent.CONN
        if self._client_id is not None and request.client_id != self._client_id:
            return ServerEvent.FOREIGN_COMMAND
        return ServerEvent.COMMAND

    def _frame(
        self, event: ServerEvent, request: Request | None, detail: str, seq: int | None
    ) -> list[Incoming]:
        """Apply the table to one frame; ``seq`` is given for a held frame."""
        transition = self._lookup(event)
        self._state = transition.next_state
        action = transition.action
        if action is ServerAction.IGNORE:
            return []
        if seq is None:
            seq = self._next_seq
            self._next_seq += 1
            self._slots[seq] = _Slot()
        incoming: list[Incoming] = []
        # EXECUTE and BUFFER rows exist only for CONN and COMMAND events, which
        # always carry a request.
        if action is ServerAction.EXECUTE and request is not None:
            self._slots[seq].handed_out = True
            if isinstance(request, Conn):
                self._conn_seq = seq
            incoming.append(Incoming(seq, request))
        elif action is ServerAction.BUFFER and request is not None:
            self._buffer.append((seq, request))
        else:
            self._answer(seq, "-FAIL:" + self._failure(action, request, detail))
            self._release()
        return incoming

    def _failure(self, action: ServerAction, request: Request | None, detail: str) -> str:
        if action is ServerAction.FAIL_CONN_FIRST and request is not None:
            return f"not connected: send CONN first (got {_word(request)})"
        if action is ServerAction.FAIL_ALREADY_CONNECTED:
            return "already connected: send CONN once per socket"
        if action is ServerAction.FAIL_FOREIGN_CLIENT and request is not None:
            claimed = getattr(request, "client_id", "")
            return f"CLIENT_ID {shorten(claimed)!r} is not the client id of this socket"
        return detail  # FAIL_MALFORMED, FAIL_BINARY

    def _drain(self) -> list[Incoming]:
        """Take held frames as if they had just arrived, until one is held again."""
        incoming: list[Incoming] = []
        while self._buffer and self._state is not ServerState.CONNECTING:
            seq, request = self._buffer.popleft()
            incoming.extend(self._frame(self._classify(request), request, "", seq))
        return incoming

    def _check_conn_seq(self, seq: int) -> None:
        if seq != self._conn_seq:
            raise LocalProtocolError(f"seq {seq} is not the CONN being decided ({self._conn_seq})")

    def _answer(self, seq: int, frame: str) -> None:
        self._slots[seq].frame = frame

    def _release(self) -> None:
        """Move ready replies, in seq order, to the outgoing frames (invariant 2)."""
        while True:
            slot = self._slots.get(self._next_release)
            if slot is None or slot.frame is None:
                return
            # Bookkeeping first: on_sent may call back into the session.
            del self._slots[self._next_release]
            self._next_release += 1
            self._outgoing.append(slot.frame)
            if slot.on_sent is not None:
                try:
                    slot.on_sent()
                except BaseException:
                    self._release()  # never strand later replies behind a bad callback
                    raise
