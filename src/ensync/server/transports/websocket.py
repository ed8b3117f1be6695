"""The WebSocket transport: the text protocol of PROTOCOL.md §3 over the engine core.

Each connection is driven by a sans-I/O :class:`ServerSession` (parsing,
"CONN first", one reply per command in order); this module only moves
frames and calls the core. Commands run concurrently, so a client may
pipeline them; replies still leave in arrival order. Publishes are
*accepted* (validated and numbered) one after the other in arrival order and
committed concurrently, so pipelined publishes keep their order.

Records of a name are pushed only after the SUB reply for that name has been
queued (§3.8 rule 4).

ensync's batched session (session.py) runs on the same connection when our
SDK asks for it: after ``CONN``, a binary message holding a session hello
starts it, and from then on binary messages carry session frames each way.
Official clients send text only, and a binary message that is not a session
frame is still answered ``-FAIL:``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ensync.crypto.keys import decode_app_id
from ensync.protocol.records import ReplayInfo, to_ws_record
from ensync.protocol.wscodec import (
    Ack,
    Conn,
    Continue,
    Defer,
    Discard,
    Extend,
    Fail,
    Pass,
    Pause,
    Pong,
    Pub,
    Record,
    Replay,
    Replayed,
    Request,
    Rollback,
    Sub,
    Unsub,
)
from ensync.protocol.wssession import Incoming, ServerSession, ServerState
from ensync.server.core import calls
from ensync.server.core.calls import SettleKind
from ensync.server.core.errors import ServiceError
from ensync.server.core.model import Delivery
from ensync.server.runtime.engine import Engine
from ensync.server.transports.session import (
    SESSION_VERSION,
    SessionOutbox,
)
from ensync.server.transports.ws_binary import BinarySession

__all__ = ["WebSocketTransport", "delivery_record"]

log = logging.getLogger(__name__)


def delivery_record(delivery: Delivery) -> Record:
    """The §3.7 record of a delivery (metadata as an object)."""
    return to_ws_record(delivery)


class WebSocketTransport:
    """Serves the text protocol on connections handed over by the HTTP listener.

    Args:
        engine: the core.
        max_outstanding: most commands of one connection in progress at once;
            beyond it the connection is not read until replies go out.
        max_frame_bytes: the largest message the connections accept; session
            frames stay 64 KiB below it.
        session: serve ensync's batched session on the connections.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        max_outstanding: int = 512,
        max_frame_bytes: int = 2 * 1024 * 1024,
        session: bool = True,
    ) -> None:
        self._engine = engine
        self._max_outstanding = max_outstanding
        self._session_frame_bytes = max(64 * 1024, max_frame_bytes - 64 * 1024) if session else 0
        self._connections: set[_Connection] = set()

    async def handle(self, websocket: ServerConnection) -> None:
        """Run one connection until it closes."""
        connection = _Connection(
            self._engine, websocket, self._max_outstanding, self._session_frame_bytes
        )
        self._connections.add(connection)
        try:
            await connection.run()
        finally:
            self._connections.discard(connection)

    @property
    def connections(self) -> int:
        return len(self._connections)

    async def drain(self, timeout_s: float) -> None:
        """Shut every connection down gracefully: refuse new commands, let the
        commands in progress finish and their replies go out (up to
        ``timeout_s``), then close with 1001 "going away"."""
        await asyncio.gather(*(c.shutdown(timeout_s) for c in list(self._connections)))


class _Connection:
    """One WebSocket connection: the engine's :class:`SessionRouter` for it too."""

    def __init__(
        self,
        engine: Engine,
        websocket: ServerConnection,
        max_outstanding: int,
        session_frame_bytes: int,
    ) -> None:
        self._engine = engine
        self._ops = engine.operations
        self._ws = websocket
        self._max_outstanding = max_outstanding
        # 0: no batched session on this connection.
        self._session_frame_bytes = session_frame_bytes
        self._binary = BinarySession(engine, websocket, self._owner, session_frame_bytes)
        self._session = ServerSession()
        self._ready_names: set[str] = set()
        self._client_id: str | None = None
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._draining = False
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------------ SessionRouter

    def sink_for(self, name: str) -> _Connection | SessionOutbox | None:
        if self._closed or name not in self._ready_names:
            return None
        outbox = self._binary.outbox
        return outbox if outbox is not None and outbox.deliveries_on else self

    def push(self, delivery: Delivery) -> None:
        self._session.push(delivery_record(delivery))
        self._wake.set()

    def room(self, name: str, held: int, window: int) -> int:
        return window - held

    def is_attached(self) -> bool:
        return not self._closed

    def close(self) -> None:
        """The engine ended this client's session: close the socket."""
        self._closed = True
        self._binary.close_outbox()
        self._spawn(self._ws.close(1008, "session ended by the engine"))

    # ------------------------------------------------------------------ driving

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        writer = loop.create_task(self._write_loop())
        # A socket that never connects a client holds a descriptor for nothing.
        handshake_s = self._engine.config.handshake_timeout_ms / 1000
        deadline = loop.call_later(handshake_s, self._check_connected, handshake_s)
        try:
            async for frame in self._ws:
                if isinstance(frame, bytes):
                    if not await self._binary.receive(frame, hello_ok=not self._draining):
                        self._session.receive_binary(frame)  # -FAIL:, as text says
                elif self._draining:
                    for item in self._session.receive_text(frame):
                        self._reply(item.seq, Fail("the engine is shutting down"))
                else:
                    await self._dispatch(self._session.receive_text(frame))
                self._wake.set()
                while self._session.outstanding() >= self._max_outstanding:
                    self._drained.clear()
                    await self._drained.wait()
        except ConnectionClosed:
            pass
        finally:
            deadline.cancel()
            self._closed = True
            self._idle.set()  # nothing more will be answered: wake a shutdown
            self._session.close()
            await self._binary.end()
            if self._client_id is not None:
                self._ops.gone(self._client_id)
            writer.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(writer, *self._tasks, return_exceptions=True)

    def _owner(self) -> str | None:
        """The client this connection connected, while it is open."""
        return None if self._closed else self._client_id

    def _check_connected(self, waited_s: float) -> None:
        if self._client_id is None and not self._closed:
            self._spawn(self._ws.close(1008, f"no valid CONN within {waited_s:g} s"))

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            frames = self._session.data_to_send()
            outstanding = self._session.outstanding()
            if outstanding < self._max_outstanding:
                self._drained.set()
            for frame in frames:
                try:
                    await self._ws.send(frame)
                except ConnectionClosed:
                    return
            if outstanding == 0 and not self._wake.is_set():
                self._idle.set()
            else:
                self._idle.clear()

    async def shutdown(self, timeout_s: float) -> None:
        """Finish what is in progress, then close with 1001 (see ``drain``)."""
        if self._closed:
            return
        self._draining = True
        self._idle.clear()
        self._wake.set()
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("closing a WebSocket with commands still in progress")
        if not self._closed:
            await self._ws.close(1001, "the engine is shutting down")

    def _spawn(self, work: Awaitable[Any]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _answer(self, seq: int, call: Callable[[], Awaitable[Pass | Replayed]]) -> None:
        """Run ``call`` concurrently and reply with its result or its refusal."""

        async def run() -> None:
            try:
                reply: Pass | Fail | Replayed = await call()
            except ServiceError as exc:
                reply = Fail(exc.message)
            except Exception:  # isolation boundary: one command's bug, not the connection's
                log.exception("WebSocket command failed")
                reply = Fail("internal error")
            self._reply(seq, reply)

        self._spawn(run())

    def _reply(
        self,
        seq: int,
        reply: Pass | Fail | Replayed,
        on_sent: Callable[[], None] | None = None,
    ) -> None:
        if self._session.state is ServerState.CLOSED:
            return
        self._session.reply(seq, reply, on_sent=on_sent)
        self._wake.set()

    async def _dispatch(self, incoming: list[Incoming]) -> None:
        for item in incoming:
            await self._run(item.seq, item.request)

    async def _run(self, seq: int, request: Request) -> None:
        ops = self._ops
        try:
            if isinstance(request, Conn):
                await self._connect(seq, request)
                return
            if isinstance(request, Pub):
                await self._publish(seq, request)
                return
            if isinstance(request, Pong):
                return
            client = request.client_id
            if isinstance(request, Sub):
                ops.subscribe(calls.Subscribe(client, request.name))
                name = request.name

                def start_pushing() -> None:
                    self._ready_names.add(name)
                    ops.routes_changed(client)

                self._reply(seq, Pass("subscribed"), on_sent=start_pushing)
            elif isinstance(request, Unsub):
                ops.unsubscribe(calls.Unsubscribe(client, request.name))
                self._ready_names.discard(request.name)
                self._reply(seq, Pass("unsubscribed"))
            elif isinstance(request, Pause):
                ops.pause(calls.Pause(client, request.name, request.reason))
                self._reply(seq, Pass("paused"))
            elif isinstance(request, Continue):
                ops.resume(calls.Resume(client, request.name))
                self._reply(seq, Pass("continued"))
            elif isinstance(request, Ack):
                acked = self._settle(calls.Settle(client, request.idem))
                self._answer(seq, lambda: self._done(acked, "acked"))
            elif isinstance(request, Discard):
                discarded = self._settle(
                    calls.Settle(client, request.idem, SettleKind.DISCARD, reason=request.reason)
                )
                self._answer(seq, lambda: self._done(discarded, "discarded"))
            elif isinstance(request, Defer):
                deferred = self._settle(
                    calls.Settle(
                        client,
                        request.idem,
                        SettleKind.DEFER,
                        delay_ms=request.delay_ms,
                        reason=request.reason,
                    )
                )
                self._answer(seq, lambda: self._value(deferred))
            elif isinstance(request, Rollback):
                # "Rollback" gives the message back unsettled: delivered again
                # after the redelivery backoff (at once the first time).
                reason = request.reason or "rolled back by the client"
                released = self._settle(
                    calls.Settle(client, request.idem, SettleKind.RELEASE, reason=reason)
                )
                self._answer(seq, lambda: self._released(released))
            elif isinstance(request, Replay):
                self._answer(seq, lambda: self._replay(client, request.idem))
            elif isinstance(request, Extend):
                extended = self._settle(calls.Settle(client, request.idem, SettleKind.EXTEND))
                self._answer(seq, lambda: self._value(extended))
            else:  # pragma: no cover - the codec produces nothing else
                self._reply(seq, Fail(f"unsupported command {type(request).__name__}"))
        except ServiceError as exc:
            self._reply(seq, Fail(exc.message))
        except Exception:  # isolation boundary: one command's bug must not kill the socket
            log.exception("WebSocket command failed")
            self._reply(seq, Fail("internal error"))

    def _settle(self, call: calls.Settle) -> asyncio.Future[int | None]:
        (answer,) = self._ops.settle([call])
        return answer

    @staticmethod
    async def _done(call: Awaitable[int | None], text: str) -> Pass:
        await call
        return Pass(text)

    @staticmethod
    async def _value(call: Awaitable[int | None]) -> Pass:
        return Pass(str(await call))

    @staticmethod
    async def _released(call: Awaitable[int | None]) -> Pass:
        when = await call
        return Pass("dead-lettered" if when is None else str(when))

    async def _replay(self, client: str, idem: str) -> Replayed:
        result = await self._ops.replay(calls.Replay(client, idem))
        info = ReplayInfo(result.replayed_at_ms, result.was_acknowledged)
        return Replayed(to_ws_record(result.delivery, info))

    async def _connect(self, seq: int, request: Conn) -> None:
        try:
            info = await self._ops.connect(request.access_key, self)
        except ServiceError as exc:
            # The socket stays open after a refused CONN (PROTOCOL.md §3.6).
            more = self._session.conn_refused(seq, exc.message)
        except Exception:  # isolation boundary, see _run
            log.exception("WebSocket CONN failed")
            more = self._session.conn_refused(seq, "internal error")
        else:
            self._client_id = info.client_id
            more = self._session.conn_accepted(
                seq,
                info.client_id,
                info.client_hash,
                extra={
                    "ackDeadlineMs": str(self._engine.config.ack_deadline_ms),
                    "maxPayloadBytes": str(self._engine.config.max_payload_bytes),
                    # Hex: official parsers cut values at "=" (PROTOCOL.md §3.6).
                    "appIdHex": decode_app_id(info.app_id).hex(),
                    # Our SDK keeps fewer requests than this on the wire.
                    "maxOutstanding": str(self._max_outstanding),
                    **({"session": str(SESSION_VERSION)} if self._session_frame_bytes else {}),
                },
            )
        self._wake.set()
        await self._dispatch(more)

    async def _publish(self, seq: int, request: Pub) -> None:
        (commit,) = await self._ops.publish(
            [
                calls.Publish(
                    request.client_id,
                    request.name,
                    request.payload,
                    request.delivery_to,
                    request.metadata,
                    request.payload_metadata,
                )
            ]
        )
        if commit.done() and isinstance(refused := commit.exception(), ServiceError):
            self._reply(seq, Fail(refused.message))  # at once: no task for a refusal
            return

        async def committed() -> Pass:
            return Pass(await commit)

        self._answer(seq, committed)
