"""ensync's batched session over one WebSocket: the same frames as the gRPC
``Session`` method (:mod:`ensync.server.transports.session`), as binary
messages on the connection that sent ``CONN`` (docs/protocol.md).

A binary message holding a ``ClientFrame`` with a hello for the connection's
own client starts the session; the frames after it feed the session. Any
other binary message is not ours: the text protocol refuses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

from google.protobuf.message import DecodeError
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from ensync._proto import ensync_pb2 as pb
from ensync.server.runtime.engine import Engine
from ensync.server.transports.session import Refusal, SessionOutbox, serve_session

__all__ = ["BinarySession"]

log = logging.getLogger(__name__)


class BinarySession:
    """The batched session of one WebSocket connection, once a hello starts it.

    Args:
        engine: the engine.
        websocket: the connection.
        owner: the client id the connection connected, ``None`` before
            ``CONN`` or once it closed.
        frame_bytes: the largest session frame; 0 turns the session off.
    """

    def __init__(
        self,
        engine: Engine,
        websocket: ServerConnection,
        owner: Callable[[], str | None],
        frame_bytes: int,
    ) -> None:
        self._engine = engine
        self._ops = engine.operations
        self._ws = websocket
        self._owner = owner
        self._frame_bytes = frame_bytes
        self._frames: asyncio.Queue[pb.ClientFrame | None] | None = None
        self._task: asyncio.Task[None] | None = None
        # The session's outbox (also the delivery sink when it carries deliveries).
        self.outbox: SessionOutbox | None = None

    async def receive(self, data: bytes, *, hello_ok: bool) -> bool:
        """Take a binary message; ``False`` if it is no session frame (the
        text protocol refuses it). ``hello_ok``: a new session may start."""
        if self._frames is not None:
            try:
                frame = pb.ClientFrame.FromString(data)
            except DecodeError:
                await self._ws.close(1007, "undecodable session frame")
                return True
            await self._frames.put(frame)  # bounded: a busy session stops the reading
            return True
        hello = self._hello(data) if hello_ok else None
        if hello is None:
            return False
        self._frames = asyncio.Queue(maxsize=4)
        self._frames.put_nowait(hello)
        self._task = asyncio.get_running_loop().create_task(self._serve())
        return True

    def close_outbox(self) -> None:
        """The engine ended the client's session."""
        if self.outbox is not None:
            self.outbox.close()

    async def end(self) -> None:
        """The connection closed: end the session and wait for it."""
        self.close_outbox()
        if self._frames is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self._frames.put_nowait(None)
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def _hello(self, data: bytes) -> pb.ClientFrame | None:
        if not self._frame_bytes or self._owner() is None:
            return None
        try:
            frame = pb.ClientFrame.FromString(data)
        except DecodeError:
            return None
        return frame if frame.HasField("hello") else None

    async def _serve(self) -> None:
        frames = self._frames
        assert frames is not None

        async def incoming() -> AsyncIterator[pb.ClientFrame]:
            while (frame := await frames.get()) is not None:
                yield frame

        try:
            await serve_session(
                self._engine,
                incoming(),
                self,
                self._attach,
                self._detach,
                max_frame_bytes=self._frame_bytes,
                leave=self._ops.gone,
            )
        except ConnectionClosed:
            pass
        except Exception:  # isolation boundary: the session's bug, not the socket's
            log.exception("the batched session of a WebSocket failed")
            await self._ws.close(1011, "session failed")

    # SessionPeer: the session's frames are binary messages on this socket.

    async def send(self, frame: pb.ServerFrame) -> None:
        await self._ws.send(frame.SerializeToString())

    async def refuse(self, why: Refusal, text: str) -> NoReturn:
        await self._ws.close(1008, text[:120])
        raise ConnectionClosed(None, None)

    def _attach(self, client_id: str, outbox: SessionOutbox) -> bool:
        if client_id != self._owner() or not self._ops.has_session(client_id):
            return False
        self.outbox = outbox
        self._ops.routes_changed(client_id)
        return True

    def _detach(self, client_id: str, outbox: SessionOutbox) -> None:
        if self.outbox is outbox:
            self.outbox = None
            if self._owner() is not None:
                self._ops.routes_changed(client_id)
