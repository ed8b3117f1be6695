"""The SDK's WebSocket transport (``websockets``, asyncio API).

One socket per connection. Requests are pipelined: each is sent at once and
answered in order (PROTOCOL.md §3.8), so many publishes can be on the wire
together. A request that gets no answer in time breaks the connection on
purpose: with FIFO correlation a late answer would be taken for the next
request's, so the link is rebuilt instead (the reconnection logic takes over).

When the engine's ``CONN`` answer offers ensync's batched session
(``session=1``), publishes, settlements and deliveries move to it: binary
messages carrying the frames of session.py, many calls per message
(`_BinaryLink`). Subscribing, pausing and replaying stay text commands.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

from google.protobuf.message import DecodeError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync.client.session import SessionStream
from ensync.client.tasks import TaskOwner
from ensync.client.transport import ConnectInfo, SettleKind, Settlement, WireReplay, digits
from ensync.client.wire import DEFAULT_MAX_IN_FLIGHT, Authenticated, WireTransport
from ensync.protocol.errors import STORE_UNAVAILABLE, UNKNOWN_SESSION
from ensync.protocol.records import from_ws_record
from ensync.protocol.urls import EngineUrl
from ensync.protocol.wsclient import (
    ClientSession,
    PingArrived,
    RecordArrived,
    ReplyFor,
    Unexpected,
)
from ensync.protocol.wscodec import (
    Ack,
    Conn,
    Continue,
    Defer,
    Discard,
    Extend,
    Fail,
    Malformed,
    Pass,
    Pause,
    Pong,
    Pub,
    Replay,
    Replayed,
    Request,
    Rollback,
    Sub,
    Unsub,
    parse_conn_fields,
    parse_conn_pass,
)

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "WebSocketClientTransport", "max_in_flight"]

log = logging.getLogger(__name__)

# Room left below the engine's bound for replies to its pings.
_RESERVED = 8


def max_in_flight(fields: dict[str, str]) -> int:
    """Requests to keep on the wire, from the CONN answer's ``maxOutstanding``."""
    value = fields.get("maxOutstanding", "")
    if not value.isdigit():
        return DEFAULT_MAX_IN_FLIGHT
    return max(1, int(value) - _RESERVED)


def _app_id(hex_text: str) -> str | None:
    """The app id from the CONN answer's ``appIdHex`` (``None``: not said)."""
    try:
        raw = bytes.fromhex(hex_text)
    except ValueError:
        return None
    return base64.b64encode(raw).decode() if raw else None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


_Arrival = pb.ServerFrame | BaseException | None


class _BinaryLink:
    """The batched session's frames as binary messages on the socket.

    Frames are read by the transport's reader; once the session has started
    they are handed to it straight from there (``push_to``), not through a
    queue and a reader task of the session's own: one loop turn less per
    frame.
    """

    def __init__(self, ws: ClientConnection, timeout_s: float) -> None:
        self._ws = ws
        self._timeout = timeout_s
        self.frames: asyncio.Queue[_Arrival] = asyncio.Queue()
        self._sink: Callable[[_Arrival], None] | None = None

    def arrived(self, item: _Arrival) -> None:
        """A frame, the end of the session (None) or why the link broke."""
        if self._sink is not None:
            self._sink(item)
        else:
            self.frames.put_nowait(item)

    def push_to(self, sink: Callable[[_Arrival], None]) -> None:
        """From now on hand every arrival to ``sink`` (those waiting first)."""
        while not self.frames.empty():
            sink(self.frames.get_nowait())
        self._sink = sink

    async def write(self, frame: pb.ClientFrame) -> None:
        try:
            # asyncio.timeout, not wait_for: no task per frame on the hot path.
            async with asyncio.timeout(self._timeout):
                await self._ws.send(frame.SerializeToString())
        except (ConnectionClosed, TimeoutError) as exc:
            raise errors.EnSyncConnectionError(f"connection to the engine lost: {exc!r}") from exc

    async def read(self) -> pb.ServerFrame | None:
        item = await self.frames.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.arrived(None)


class WebSocketClientTransport(WireTransport):
    """A `ClientTransport` over WebSocket.

    Args:
        url: the parsed ``ws://`` or ``wss://`` URL; a bare path means ``/message``.
        call_timeout_s: how long a request may wait for its answer.
        root_certificates: PEM bytes of a CA to trust for ``wss://``.
        max_frame_bytes: largest frame accepted from the engine.
    """

    def __init__(
        self,
        url: EngineUrl,
        *,
        call_timeout_s: float = 30.0,
        root_certificates: bytes | None = None,
        max_frame_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        super().__init__(call_timeout_s=call_timeout_s)
        path = url.path if url.path not in ("", "/") else "/message"
        host = f"[{url.host}]" if ":" in url.host else url.host
        self._uri = f"{url.scheme}://{host}:{url.port}{path}"
        self._ssl: ssl.SSLContext | None = None
        if url.secure:
            self._ssl = ssl.create_default_context()
            if root_certificates is not None:
                self._ssl.load_verify_locations(cadata=root_certificates.decode("ascii"))
        self._max_frame = max_frame_bytes
        self._ws: ClientConnection | None = None
        self._session = ClientSession()
        self._pending: dict[int, asyncio.Future[Pass | Fail | Replayed]] = {}
        # The reader, and the answers to the engine's pings.
        self._tasks = TaskOwner()
        self._send_lock = asyncio.Lock()
        self._link: _BinaryLink | None = None

    # ------------------------------------------------------------------ WireTransport

    async def _authenticate(self, app_key: str) -> Authenticated:
        try:
            self._ws = await asyncio.wait_for(
                connect(
                    self._uri,
                    ssl=self._ssl,
                    max_size=self._max_frame,
                    compression=None,
                    # Liveness is the connection layer's heartbeat (ping frames).
                    ping_interval=None,
                    open_timeout=None,
                ),
                self._timeout,
            )
        except TimeoutError:
            raise errors.EnSyncTimeoutError(
                f"no WebSocket handshake with {self._uri} in {self._timeout:g} s"
            ) from None
        except (OSError, InvalidHandshake, InvalidURI) as exc:
            raise errors.EnSyncConnectionError(f"cannot connect to {self._uri}: {exc}") from exc
        self._tasks.start(self._read(self._ws), name="ensync-ws-reader")
        reply = await self._request(Conn(app_key), errors.EnSyncAuthError, limited=False)
        if isinstance(reply, Fail):
            if STORE_UNAVAILABLE in reply.reason:
                raise errors.EnSyncConnectionError(f"the engine: {reply.reason}")
            raise errors.EnSyncAuthError(f"Authentication failed: {reply.reason}")
        text = reply.text if isinstance(reply, Pass) else ""
        parsed = parse_conn_pass(text)
        if isinstance(parsed, Malformed):
            raise errors.EnSyncConnectionError(f"unreadable CONN answer: {parsed.reason}")
        client_id, client_hash = parsed
        fields = parse_conn_fields(text)
        info = ConnectInfo(
            client_id,
            client_hash,
            digits(fields.get("ackDeadlineMs", "")),
            digits(fields.get("maxPayloadBytes", "")),
            _app_id(fields.get("appIdHex", "")),
        )
        return Authenticated(
            info, max_in_flight(fields), offers_session=fields.get("session", "").isdigit()
        )

    async def _open_session(self) -> SessionStream | None:
        if self._ws is None:
            raise errors.EnSyncConnectionError("the connection is closed")
        self._link = _BinaryLink(self._ws, self._timeout)
        return await self._start_session(self._link)

    async def _publish_unbatched(
        self, name: str, recipient: str, payload: str, metadata: str, payload_metadata: str | None
    ) -> str:
        request = Pub(self._client_id, name, payload, recipient, metadata, payload_metadata)
        return await self._checked(request, errors.EnSyncPublishError)

    async def _settle_unbatched(self, settlement: Settlement) -> int | None:
        client, idem, name, kind = (
            self._client_id,
            settlement.idem,
            settlement.name,
            settlement.kind,
        )
        error = settlement.error
        if kind is SettleKind.ACK:
            await self._checked(Ack(client, idem, settlement.block, name), error)
            return None
        if kind is SettleKind.DISCARD:
            await self._checked(Discard(client, idem, name, settlement.reason), error)
            return None
        if kind is SettleKind.DEFER:
            request: Request = Defer(client, idem, name, settlement.delay_ms, settlement.reason)
            text = await self._checked(request, error)
            if not text.isdigit():
                raise error(f"unreadable defer answer {text[:40]!r}")
            return int(text)
        if kind is SettleKind.EXTEND:
            text = await self._checked(Extend(client, idem, name), error)
            return int(text) if text.isdigit() else 0
        # ROLLBACK is the text protocol's "give it back" (REASON is our extension).
        text = await self._checked(Rollback(client, idem, None, settlement.reason), error)
        return int(text) if text.isdigit() else None

    async def _subscribe_wire(self, name: str) -> None:
        await self._checked(Sub(self._client_id, name), errors.EnSyncSubscriptionError)

    async def _unsubscribe_wire(self, name: str) -> None:
        await self._checked(Unsub(self._client_id, name), errors.EnSyncSubscriptionError)

    async def _close_wire(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        await self._tasks.close()

    # ------------------------------------------------------------------ requests

    async def _request(
        self, request: Request, error: type[errors.EnSyncError], *, limited: bool = True
    ) -> Pass | Fail | Replayed:
        if self._closed or self._ws is None:
            raise errors.EnSyncConnectionError("the connection is closed")
        if not limited:
            return await self._exchange(request)
        # The engine stops reading a socket with too many commands in
        # progress; requests queued behind those would time out here and
        # break a healthy link, so they wait for a slot instead.
        async with self._limiter.slot():
            return await self._exchange(request)

    async def _exchange(self, request: Request) -> Pass | Fail | Replayed:
        if self._closed or self._ws is None:
            raise errors.EnSyncConnectionError("the connection is closed")
        future: asyncio.Future[Pass | Fail | Replayed] = asyncio.get_running_loop().create_future()
        # Its caller may have timed out or been cancelled before the link
        # failed the future: mark the failure seen so it is not reported as
        # "never retrieved".
        future.add_done_callback(_retrieve)
        async with self._send_lock:
            # seq and send happen together so frames leave in seq order.
            seq, frame = self._session.send(request)
            if seq is not None:
                self._pending[seq] = future
            try:
                # A send waits while the socket's buffer is full; a link that
                # takes nothing for a whole call timeout is as good as dead.
                async with asyncio.timeout(self._timeout):
                    await self._ws.send(frame)
            except (ConnectionClosed, TimeoutError) as exc:
                if seq is not None:
                    self._pending.pop(seq, None)
                lost = errors.EnSyncConnectionError(f"connection to the engine lost: {exc!r}")
                self._report_lost(lost)
                raise lost from exc
        if seq is None:
            return Pass("")
        try:
            return await asyncio.wait_for(future, self._timeout)
        except TimeoutError:
            self._pending.pop(seq, None)
            # Replies are matched in order: a missing one poisons every later
            # match, so the link is rebuilt rather than trusted.
            self._report_lost(errors.EnSyncTimeoutError("a request got no answer"))
            raise errors.EnSyncTimeoutError(
                f"the engine did not answer in {self._timeout:g} s"
            ) from None

    async def _checked(self, request: Request, error: type[errors.EnSyncError]) -> str:
        reply = await self._request(request, error)
        if isinstance(reply, Fail):
            if reply.reason.startswith(UNKNOWN_SESSION):
                lost = errors.EnSyncConnectionError(
                    f"the engine dropped this session: {reply.reason}"
                )
                self._report_lost(lost)
                raise lost
            raise error(reply.reason)
        if isinstance(reply, Replayed):
            raise error("unexpected replay answer")
        return reply.text

    async def _read(self, ws: ClientConnection) -> None:
        cause: BaseException = errors.EnSyncConnectionError("the engine closed the connection")
        cancelled = False
        try:
            async for frame in ws:
                if isinstance(frame, bytes):
                    self._binary(frame)
                    continue
                for event in self._session.receive_text(frame):
                    self._handle(event)
        except ConnectionClosed as exc:
            cause = errors.EnSyncConnectionError(f"connection to the engine lost: {exc}")
        except asyncio.CancelledError:
            # Closed by us, or the program is ending (asyncio.run cancels every
            # task): not a lost link, so no reconnection starts.
            cancelled = True
            raise
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(errors.EnSyncConnectionError("connection lost"))
            self._pending.clear()
            if self._link is not None and not cancelled:
                self._link.arrived(cause)
            if not cancelled:
                self._report_lost(cause)

    def _binary(self, data: bytes) -> None:
        if self._link is None:
            log.warning("ignoring a binary frame from the engine")
            return
        try:
            frame = pb.ServerFrame.FromString(data)
        except DecodeError:
            self._link.arrived(
                errors.EnSyncConnectionError("the engine sent an undecodable session frame")
            )
            return
        self._link.arrived(frame)

    def _handle(self, event: object) -> None:
        if isinstance(event, ReplyFor):
            future = self._pending.pop(event.seq, None)
            if future is not None and not future.done():
                future.set_result(event.reply)
        elif isinstance(event, RecordArrived):
            handler = self._routes.get(event.record.name)
            if handler is not None:
                handler(from_ws_record(event.record)[0])
        elif isinstance(event, PingArrived):
            self._tasks.start(self._pong(), name="ensync-ws-pong")
        elif isinstance(event, Unexpected):
            log.warning("unexpected frame from the engine: %s", event.reason)

    async def _pong(self) -> None:
        with contextlib.suppress(errors.EnSyncError):
            await self._request(Pong(), errors.EnSyncConnectionError, limited=False)

    # ------------------------------------------------------------------ operations

    async def heartbeat(self) -> None:
        """Ping the engine; raises EnSyncConnectionError without a pong in time."""
        if self._ws is None or self._closed:
            raise errors.EnSyncConnectionError("the connection is closed")
        try:
            async with asyncio.timeout(self._timeout):
                pong = await self._ws.ping()
                await pong
        except (ConnectionClosed, TimeoutError) as exc:
            raise errors.EnSyncConnectionError("the engine does not answer pings") from exc

    async def replay(self, name: str, idem: str) -> WireReplay:
        """Read a message of the app back by idem."""
        reply = await self._request(Replay(self._client_id, idem, name), errors.EnSyncReplayError)
        if isinstance(reply, Fail):
            raise errors.EnSyncReplayError(reply.reason)
        if not isinstance(reply, Replayed):
            raise errors.EnSyncReplayError("the engine answered a replay without a record")
        message, info = from_ws_record(reply.record)
        return WireReplay(message, info)

    async def pause(self, name: str, reason: str) -> None:
        """No new deliveries of ``name`` until `resume`."""
        await self._checked(Pause(self._client_id, name, reason), errors.EnSyncPauseError)

    async def resume(self, name: str) -> None:
        """Undo `pause`."""
        await self._checked(Continue(self._client_id, name), errors.EnSyncContinueError)
