"""The batched session over gRPC: the ``EnSyncSession/Session`` method.

`GrpcFrameLink` carries the session's frames (`ensync.client.session`) on
one bidirectional call, and `open_grpc_session` opens it, telling an engine
without the method (the transport then uses unary calls) from one that
refused the session.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import grpc

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync.client.session import FrameLink, SessionStream

__all__ = ["SESSION_METHOD", "GrpcFrameLink", "open_grpc_session"]

SESSION_METHOD = "/ensync.EnSyncSession/Session"


class GrpcFrameLink:
    """The batched session's frames on one ``Session`` call (a `FrameLink`)."""

    def __init__(self, call: grpc.aio.StreamStreamCall[pb.ClientFrame, pb.ServerFrame]) -> None:
        self._call = call

    async def write(self, frame: pb.ClientFrame) -> None:
        """Send one frame; raises `EnSyncConnectionError` if the call broke."""
        try:
            await self._call.write(frame)
        except grpc.aio.AioRpcError as exc:
            raise errors.EnSyncConnectionError(f"the session broke: {exc.code().name}") from exc
        except asyncio.InvalidStateError:
            raise errors.EnSyncConnectionError("the session ended") from None

    async def read(self) -> pb.ServerFrame | None:
        """The next frame; ``None`` at the end; raises `EnSyncConnectionError` if the call broke."""
        try:
            frame = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise errors.EnSyncConnectionError(
                f"the session broke: {exc.details() or exc.code().name}"
            ) from exc
        if frame is grpc.aio.EOF:
            return None
        if not isinstance(frame, pb.ServerFrame):  # EOF is the only other value
            raise errors.EnSyncConnectionError(f"the session read {type(frame).__name__}")
        return frame

    def cancel(self) -> None:
        """End the call."""
        self._call.cancel()


async def open_grpc_session(
    channel: grpc.aio.Channel, start: Callable[[FrameLink], Awaitable[SessionStream]]
) -> SessionStream | None:
    """Open a session on ``channel``; ``None`` if the engine has no session.

    ``start`` starts it on the link (the transport's
    `WireTransport._start_session`).

    Raises:
        EnSyncConnectionError: the engine refused the session.
        EnSyncTimeoutError: the engine did not answer in time.
    """
    method: grpc.aio.StreamStreamMultiCallable[pb.ClientFrame, pb.ServerFrame] = (
        channel.stream_stream(
            SESSION_METHOD,
            request_serializer=pb.ClientFrame.SerializeToString,
            response_deserializer=pb.ServerFrame.FromString,
        )
    )
    try:
        return await start(GrpcFrameLink(method()))
    except errors.EnSyncConnectionError as exc:
        cause = exc.__cause__
        if isinstance(cause, grpc.aio.AioRpcError):
            if cause.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None  # an engine without the session: unary calls it is
            raise errors.EnSyncConnectionError(
                f"the engine refused the session: {cause.details() or cause.code().name}"
            ) from cause
        raise
