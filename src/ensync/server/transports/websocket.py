"""The WebSocket transport: the text protocol of PROTOCOL.md §3 over the engine core.

Each connection is driven by a sans-I/O :class:`ServerSession` (parsing,
"CONN first", one reply per command in order); this module only moves
frames and calls the core. Commands run concurrently, so a client may
pipeline them; replies still leave in arrival order. Publishes are
*accepted* (validated and numbered) one after the other in arrival order and
committed concurrently, so pipelined publishes keep their order.

Records of a name are pushed only after the SUB reply for that name has been
queued (§3.8 rule 4).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

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
from ensync.server.core.errors import ServiceError
from ensync.server.core.model import Delivery
from ensync.server.runtime.engine import Engine

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
    """

    def __init__(self, engine: Engine, *, max_outstanding: int = 512) -> None:
        self._engine = engine
        self._max_outstanding = max_outstanding
        self._connections: set[_Connection] = set()

    async def handle(self, websocket: ServerConnection) -> None:
        """Run one connection until it closes."""
        connection = _Connection(self._engine, websocket, self._max_outstanding)
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

    def __init__(self, engine: Engine, websocket: ServerConnection, max_outstanding: int) -> None:
        self._engine = engine
        self._ws = websocket
        self._max_outstanding = max_outstanding
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

    def sink_for(self, name: str) -> _Connection | None:
        return self if not self._closed and name in self._ready_names else None

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
        self._spawn(self._ws.close(1008, "session ended by the engine"))

    # ------------------------------------------------------------------ driving

    async def run(self) -> None:
        writer = asyncio.get_running_loop().create_task(self._write_loop())
        try:
            async for frame in self._ws:
                if isinstance(frame, bytes):
                    self._session.receive_binary(frame)
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
            self._closed = True
            self._idle.set()  # nothing more will be answered: wake a shutdown
            self._session.close()
            if self._client_id is not None:
                self._engine.disconnect(self._client_id)
            writer.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(writer, *self._tasks, return_exceptions=True)

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
            await asyncio.wait_for(self._idle.wait(), timeout_s)
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
        engine = self._engine
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
                engine.subscribe(client, request.name)
                name = request.name

                def start_pushing() -> None:
                    self._ready_names.add(name)
                    engine.routes_changed(client)

                self._reply(seq, Pass("subscribed"), on_sent=start_pushing)
            elif isinstance(request, Unsub):
                engine.unsubscribe(client, request.name)
                self._ready_names.discard(request.name)
                self._reply(seq, Pass("unsubscribed"))
            elif isinstance(request, Pause):
                engine.pause(client, request.name, request.reason)
                self._reply(seq, Pass("paused"))
            elif isinstance(request, Continue):
                engine.resume(client, request.name)
                self._reply(seq, Pass("continued"))
            elif isinstance(request, Ack):
                self._answer(seq, lambda: self._done(engine.ack(client, request.idem), "acked"))
            elif isinstance(request, Discard):
                call = engine.discard(client, request.idem, request.reason)
                self._answer(seq, lambda: self._done(call, "discarded"))
            elif isinstance(request, Defer):
                deferred = engine.defer(client, request.idem, request.delay_ms, request.reason)
                self._answer(seq, lambda: self._value(deferred))
            elif isinstance(request, Rollback):
                # "Rollback" gives the message back unsettled: delivered again
                # after the redelivery backoff (at once the first time).
                released = engine.release(
                    client, request.idem, request.reason or "rolled back by the client"
                )
                self._answer(seq, lambda: self._released(released))
            elif isinstance(request, Replay):
                self._answer(seq, lambda: self._replay(client, request.idem))
            elif isinstance(request, Extend):
                extended = engine.extend(client, request.idem)
                self._answer(seq, lambda: self._value(extended))
            else:  # pragma: no cover - the codec produces nothing else
                self._reply(seq, Fail(f"unsupported command {type(request).__name__}"))
        except ServiceError as exc:
            self._reply(seq, Fail(exc.message))
        except Exception:  # isolation boundary: one command's bug must not kill the socket
            log.exception("WebSocket command failed")
            self._reply(seq, Fail("internal error"))

    @staticmethod
    async def _done(call: Awaitable[None], text: str) -> Pass:
        await call
        return Pass(text)

    @staticmethod
    async def _value(call: Awaitable[int]) -> Pass:
        return Pass(str(await call))

    @staticmethod
    async def _released(call: Awaitable[int | None]) -> Pass:
        when = await call
        return Pass("dead-lettered" if when is None else str(when))

    async def _replay(self, client: str, idem: str) -> Replayed:
        result = await self._engine.replay(client, idem)
        info = ReplayInfo(result.replayed_at_ms, result.was_acknowledged)
        return Replayed(to_ws_record(result.delivery, info))

    async def _connect(self, seq: int, request: Conn) -> None:
        try:
            info = await self._engine.connect(request.access_key, self)
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
                    # Our SDK keeps fewer requests than this on the wire.
                    "maxOutstanding": str(self._max_outstanding),
                },
            )
        self._wake.set()
        await self._dispatch(more)

    async def _publish(self, seq: int, request: Pub) -> None:
        try:
            commit = await self._engine.accept_publish(
                request.client_id,
                request.name,
                request.payload,
                request.delivery_to,
                request.metadata,
                request.payload_metadata,
            )
        except ServiceError as exc:
            self._reply(seq, Fail(exc.message))
            return

        async def committed() -> Pass:
            return Pass(await commit)

        self._answer(seq, committed)
