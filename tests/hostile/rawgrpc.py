"""Raw gRPC calls: chosen bytes through a real channel, the answer classified.

The request serializer is the identity, so any bytes reach the engine as
the request message; the response is decoded with the method's real type.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from ensync._proto import ensync_pb2 as pb
from tests.support.timing import seconds

__all__ = [
    "METHODS",
    "RETRIED_BY_CLIENTS",
    "SERVICE",
    "Answer",
    "RawGrpc",
    "decodes",
]

SERVICE = "/ensync.EnSyncService/"

# method -> (request type, response type); Subscribe is the only stream.
METHODS: dict[str, tuple[type[ProtoMessage], type[ProtoMessage]]] = {
    "Connect": (pb.ConnectRequest, pb.ConnectResponse),
    "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatResponse),
    "Subscribe": (pb.SubscribeRequest, pb.MessageStreamResponse),
    "Unsubscribe": (pb.UnsubscribeRequest, pb.UnsubscribeResponse),
    "PublishMessage": (pb.PublishMessageRequest, pb.PublishMessageResponse),
    "PublishEvent": (pb.PublishMessageRequest, pb.PublishMessageResponse),
    "AcknowledgeMessage": (pb.AcknowledgeRequest, pb.AcknowledgeResponse),
    "AcknowledgeEvent": (pb.AcknowledgeRequest, pb.AcknowledgeResponse),
    "DeferMessage": (pb.DeferRequest, pb.DeferResponse),
    "DeferEvent": (pb.DeferRequest, pb.DeferResponse),
    "DiscardMessage": (pb.DiscardRequest, pb.DiscardResponse),
    "DiscardEvent": (pb.DiscardRequest, pb.DiscardResponse),
    "ReplayMessage": (pb.ReplayRequest, pb.ReplayResponse),
    "ReplayEvent": (pb.ReplayRequest, pb.ReplayResponse),
    "PauseMessages": (pb.PauseRequest, pb.PauseResponse),
    "PauseEvents": (pb.PauseRequest, pb.PauseResponse),
    "ContinueMessages": (pb.ContinueRequest, pb.ContinueResponse),
    "ContinueEvents": (pb.ContinueRequest, pb.ContinueResponse),
    "ExtendMessage": (pb.ExtendRequest, pb.ExtendResponse),
    "ReleaseMessage": (pb.ReleaseRequest, pb.ReleaseResponse),
}

# PROTOCOL.md §2.3: the Go client retries these (a publish is sent again),
# P-grpc takes UNAVAILABLE / INTERNAL on a stream for a lost connection.
RETRIED_BY_CLIENTS = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def decodes(method: str, body: bytes) -> bool:
    """Whether ``body`` is a valid request message of ``method`` for protobuf-python."""
    request_type, _ = METHODS[method]
    try:
        request_type.FromString(body)
    except DecodeError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class Answer:
    """How the engine answered one raw call."""

    method: str
    label: str
    code: grpc.StatusCode
    details: str
    response: Any  # the decoded response message (OK only), else None

    @property
    def success(self) -> bool:
        return bool(self.response is not None and getattr(self.response, "success", False))

    @property
    def text(self) -> str:
        """The response's failure text (``error_message`` or ``message``), or the status details."""
        if self.response is None:
            return self.details
        for name in ("error_message", "message"):
            value = getattr(self.response, name, None)
            if isinstance(value, str) and value:
                return value
        return ""

    def __str__(self) -> str:
        what = f"success={self.success} {self.text[:120]!r}" if self.response is not None else ""
        return f"{self.method} [{self.label}] -> {self.code.name} {what or self.details[:160]!r}"


class RawGrpc:
    """One channel to the engine for raw calls.

    Args:
        port: the engine's gRPC port.
        fresh_connection: use a subchannel of its own (a TCP connection that
            no other channel of this process shares).
    """

    def __init__(self, port: int, *, fresh_connection: bool = False) -> None:
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", -1),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
        ]
        if fresh_connection:
            options.append(("grpc.use_local_subchannel_pool", 1))
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)

    async def call(
        self, method: str, body: bytes | ProtoMessage, label: str = "", timeout_s: float = 5.0
    ) -> Answer:
        """One unary call (Subscribe: the stream's first item or its end)."""
        data = body if isinstance(body, bytes) else body.SerializeToString()
        _, response_type = METHODS[method]
        if method == "Subscribe":
            return await self._subscribe(data, label, timeout_s)
        multicallable: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = self.channel.unary_unary(
            SERVICE + method,
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        try:
            raw = await multicallable(data, timeout=seconds(timeout_s))
        except grpc.aio.AioRpcError as exc:
            return Answer(method, label, exc.code(), exc.details() or "", None)
        return Answer(method, label, grpc.StatusCode.OK, "", response_type.FromString(raw))

    async def _subscribe(self, data: bytes, label: str, timeout_s: float) -> Answer:
        multicallable: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = self.channel.unary_stream(
            SERVICE + "Subscribe",
            request_serializer=_identity,
            response_deserializer=_identity,
        )
        call = multicallable(data)
        try:
            # A valid Subscribe stays open: that is an OK answer too.
            item = await asyncio.wait_for(call.read(), seconds(timeout_s))
        except TimeoutError:
            call.cancel()
            return Answer("Subscribe", label, grpc.StatusCode.OK, "stream open", None)
        except grpc.aio.AioRpcError as exc:
            return Answer("Subscribe", label, exc.code(), exc.details() or "", None)
        if item is not grpc.aio.EOF:
            call.cancel()
            return Answer("Subscribe", label, grpc.StatusCode.OK, "stream delivering", None)
        code = await call.code()
        details = await call.details()
        call.cancel()
        return Answer("Subscribe", label, code, details or "", None)

    async def close(self) -> None:
        await self.channel.close()


def _identity(data: bytes) -> bytes:
    return data
