"""The gRPC transport: ``ensync.EnSyncService`` over the engine core.

Both method generations (``PublishMessage`` and ``PublishEvent``, ...) are
served by the same handlers; the Event-generation requests share the byte
layout of the Message-generation ones (PROTOCOL.md §2.1), so one set of
message classes decodes both.

Compatibility rules implemented here (PROTOCOL.md §2.3-2.7, §7):

* semantic errors are ``success=false`` with a reason, never a status that a
  client retries;
* each message goes to a client on exactly one Subscribe stream: for grpc-js
  clients the oldest open stream, for everyone else the oldest stream opened
  for that message's name (messages wait until one is open);
* streams are never ended on Unsubscribe, and a grpc-js client's streams are
  never ended with an error status (it would crash the Node process);
* Replay's ``message_data`` is the bare payload for ``grpc-python`` clients
  and a JSON object for the others.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from ensync._proto import ensync_pb2 as pb
from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.model import Delivery, DeliverySink, ReplayResult
from ensync.server.runtime.engine import Engine

__all__ = ["GrpcTransport", "replay_message_data"]

log = logging.getLogger(__name__)

SERVICE = "ensync.EnSyncService"

_Req = TypeVar("_Req", bound=ProtoMessage)
_Resp = TypeVar("_Resp", bound=ProtoMessage)

_STATUS = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorCode.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    ErrorCode.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
    # Never RESOURCE_EXHAUSTED or UNAVAILABLE: the Go client retries those.
    ErrorCode.LIMIT_EXCEEDED: grpc.StatusCode.FAILED_PRECONDITION,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.FAILED_PRECONDITION,
}


def _user_agent(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == "user-agent":
            return value if isinstance(value, str) else value.decode("latin-1")
    return ""


def _is_grpc_js(user_agent: str) -> bool:
    return user_agent.startswith("grpc-node-js/")


def replay_message_data(result: ReplayResult, *, user_agent: str, event_names: bool) -> str:
    """What Replay's ``message_data`` carries for this client (PROTOCOL.md §2.7).

    ``grpc-python`` clients decrypt the field directly, so they get the bare
    payload; every other client parses a JSON object shaped like a stream
    message, with the replay information inside the ``metadata`` string.
    """
    delivery = result.delivery
    if user_agent.startswith("grpc-python"):
        return delivery.payload
    try:
        meta = json.loads(delivery.metadata) if delivery.metadata else {}
    except (ValueError, RecursionError):
        meta = {}
    if not isinstance(meta, dict):
        meta = {}
    internal = meta.get("$internal")
    if not isinstance(internal, dict):
        internal = {}
    internal["replay_info"] = {
        "isReplayed": True,
        "replayTimestamp": result.replayed_at_ms,
        "wasAcknowledged": result.was_acknowledged,
    }
    meta["$internal"] = internal
    prefix = "event" if event_names else "message"
    return json.dumps(
        {
            f"{prefix}_idem": delivery.idem,
            f"{prefix}_name": delivery.name,
            "payload": delivery.payload,
            "partition_block": delivery.block,
            "metadata": json.dumps(meta, separators=(",", ":")),
            "sender": delivery.sender,
        },
        separators=(",", ":"),
    )


@dataclass(frozen=True, slots=True)
class _Undecodable:
    """A request body that is not the protobuf message it should be."""

    reason: str


def _decoder(message_type: type[_Req]) -> Callable[[bytes], _Req | _Undecodable]:
    """A deserializer that never raises: grpcio would answer an exception with
    UNKNOWN (a status clients treat as a broken link) and log a traceback per
    request, so garbage becomes a value the handler refuses with INVALID_ARGUMENT."""
    name = message_type.DESCRIPTOR.full_name

    def decode(data: bytes) -> _Req | _Undecodable:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError, RecursionError):
            return _Undecodable(f"the request is not a valid {name}")

    return decode


@dataclass(eq=False, slots=True)
class _Stream:
    """One open Subscribe stream and its outbox."""

    name: str
    queue: asyncio.Queue[Delivery | None] = field(default_factory=asyncio.Queue)

    def push(self, delivery: Delivery) -> None:
        self.queue.put_nowait(delivery)

    def end(self) -> None:
        self.queue.put_nowait(None)


@dataclass(eq=False, slots=True)
class _Client:
    """The transport's view of one client id: its streams, in opening order."""

    client_id: str
    user_agent: str
    streams: list[_Stream] = field(default_factory=list)
    # An Event-generation call marks an older grpc-js client, which reads
    # every stream it opens: route per name for it (PROTOCOL.md §2.5).
    event_generation: bool = False
    closed: bool = False

    @property
    def oldest_stream_only(self) -> bool:
        return _is_grpc_js(self.user_agent) and not self.event_generation

    def sink_for(self, name: str) -> DeliverySink | None:
        if self.closed or not self.streams:
            return None
        if self.oldest_stream_only:
            return self.streams[0]
        for stream in self.streams:
            if stream.name == name:
                return stream
        return None

    def is_attached(self) -> bool:
        return bool(self.streams)

    def close(self) -> None:
        self.closed = True
        for stream in self.streams:
            stream.end()


class GrpcTransport:
    """Serves the engine over gRPC.

    Example::

        transport = GrpcTransport(engine, "127.0.0.1:0")
        port = await transport.start()
        ...
        await transport.stop()
    """

    def __init__(
        self,
        engine: Engine,
        address: str,
        *,
        credentials: grpc.ServerCredentials | None = None,
        max_message_bytes: int | None = None,
    ) -> None:
        self._engine = engine
        self._address = address
        self._credentials = credentials
        limit = max_message_bytes or engine.config.max_payload_bytes + 256 * 1024
        self.max_streams = max(200, engine.config.max_subscriptions_per_client + 100)
        self._server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", limit),
                ("grpc.max_send_message_length", limit),
                # Bounds what one connection can open at once (a "rapid reset"
                # flood of streams otherwise starves every other client), with
                # room for a client's every subscription stream plus its calls.
                ("grpc.max_concurrent_streams", self.max_streams),
                # Count streams as HTTP/2 does, as clients do. By default the
                # server counts a stream until its call object is freed, which
                # lags behind the trailers the client saw: a client that keeps
                # the advertised number of calls in flight (as grpcio and
                # grpc-js do, queueing the rest) got REFUSED_STREAM, which
                # official clients read as a lost connection.
                ("grpc.http.overload_protection", 0),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ]
        )
        self._clients: dict[str, _Client] = {}
        self._server.add_generic_rpc_handlers((self._handlers(),))
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        if self._credentials is None:
            self.port = self._server.add_insecure_port(self._address)
        else:
            self.port = self._server.add_secure_port(self._address, self._credentials)
        if self.port == 0:
            raise OSError(f"cannot listen for gRPC on {self._address}")
        await self._server.start()
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        """Refuse new calls at once, end every stream cleanly (status OK), let
        unary calls in progress finish (up to ``grace_s``), then close."""
        stopping = asyncio.get_running_loop().create_task(self._server.stop(grace_s))
        await asyncio.sleep(0)  # let stop() refuse new calls before streams end
        for client in list(self._clients.values()):
            client.close()
        await stopping

    # ------------------------------------------------------------------ wiring

    def _handlers(self) -> grpc.GenericRpcHandler:
        unary = self._unary
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Connect": unary(pb.ConnectRequest, self._connect),
            "Heartbeat": unary(pb.HeartbeatRequest, self._heartbeat),
            "Unsubscribe": unary(pb.UnsubscribeRequest, self._unsubscribe),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self._subscribe,
                request_deserializer=_decoder(pb.SubscribeRequest),
                response_serializer=pb.MessageStreamResponse.SerializeToString,
            ),
        }
        for generation, event in (("Message", False), ("Event", True)):
            plural = "Messages" if not event else "Events"
            handlers |= {
                f"Publish{generation}": unary(pb.PublishMessageRequest, self._publish, event),
                f"Acknowledge{generation}": unary(pb.AcknowledgeRequest, self._ack, event),
                f"Defer{generation}": unary(pb.DeferRequest, self._defer, event),
                f"Discard{generation}": unary(pb.DiscardRequest, self._discard, event),
                f"Replay{generation}": unary(pb.ReplayRequest, self._replay, event),
                f"Pause{plural}": unary(pb.PauseRequest, self._pause, event),
                f"Continue{plural}": unary(pb.ContinueRequest, self._continue, event),
            }
        handlers |= {
            "ExtendMessage": unary(pb.ExtendRequest, self._extend),
            "ReleaseMessage": unary(pb.ReleaseRequest, self._release),
        }
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _unary(
        self,
        request_type: type[_Req],
        behaviour: Callable[[_Req, grpc.aio.ServicerContext[Any, Any], bool], Awaitable[_Resp]],
        event: bool = False,
    ) -> grpc.RpcMethodHandler[_Req | _Undecodable, _Resp]:
        async def handle(
            request: _Req | _Undecodable, context: grpc.aio.ServicerContext[Any, Any]
        ) -> _Resp:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return await behaviour(request, context, event)

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=_decoder(request_type),
            response_serializer=lambda message: message.SerializeToString(),
        )

    def _mark_generation(self, client_id: str, event: bool) -> None:
        if event:
            client = self._clients.get(client_id)
            if client is not None:
                client.event_generation = True

    # ------------------------------------------------------------------ unary calls

    async def _connect(
        self, request: pb.ConnectRequest, context: grpc.aio.ServicerContext[Any, Any], _: bool
    ) -> pb.ConnectResponse:
        client = _Client(client_id="", user_agent=_user_agent(context))
        try:
            info = await self._engine.connect(request.access_key, client)
        except ServiceError as exc:
            return pb.ConnectResponse(success=False, error_message=exc.message)
        except Exception:  # isolation boundary: a bug must not become a retryable status
            log.exception("Connect failed")
            return pb.ConnectResponse(success=False, error_message="internal error")
        client.client_id = info.client_id
        self._clients[info.client_id] = client
        return pb.ConnectResponse(
            success=True,
            client_id=info.client_id,
            client_hash=info.client_hash,
            server_config={
                "server": "ensync",
                "app_id": info.app_id,
                "ack_deadline_ms": str(self._engine.config.ack_deadline_ms),
                # No official client reads these; ours sizes its calls in flight by them.
                "max_concurrent_streams": str(self.max_streams),
                "max_subscriptions_per_client": str(
                    self._engine.config.max_subscriptions_per_client
                ),
            },
        )

    async def _heartbeat(
        self, request: pb.HeartbeatRequest, context: grpc.aio.ServicerContext[Any, Any], _: bool
    ) -> pb.HeartbeatResponse:
        alive = self._engine.heartbeat(request.client_id)
        if not alive:
            self._clients.pop(request.client_id, None)
        return pb.HeartbeatResponse(success=alive)

    async def _publish(
        self,
        request: pb.PublishMessageRequest,
        context: grpc.aio.ServicerContext[Any, Any],
        event: bool,
    ) -> pb.PublishMessageResponse:
        self._mark_generation(request.client_id, event)
        try:
            idem = await self._engine.publish(
                request.client_id,
                request.message_name,
                request.payload,
                request.delivery_to,
                request.metadata,
                request.payload_metadata if request.HasField("payload_metadata") else None,
            )
        except ServiceError as exc:
            return pb.PublishMessageResponse(success=False, error_message=exc.message)
        except Exception:  # isolation boundary, see _connect
            log.exception("Publish failed")
            return pb.PublishMessageResponse(success=False, error_message="internal error")
        return pb.PublishMessageResponse(success=True, message_idem=idem)

    async def _unsubscribe(
        self, request: pb.UnsubscribeRequest, context: grpc.aio.ServicerContext[Any, Any], _: bool
    ) -> pb.UnsubscribeResponse:
        async def run() -> str:
            # Streams stay open (PROTOCOL.md §2.5 rule 3): only the name set changes.
            was = self._engine.unsubscribe(request.client_id, request.message_name)
            return "unsubscribed" if was else "was not subscribed"

        success, text = await _guard(run())
        return pb.UnsubscribeResponse(success=success, message=text)

    async def _ack(
        self, request: pb.AcknowledgeRequest, context: grpc.aio.ServicerContext[Any, Any], ev: bool
    ) -> pb.AcknowledgeResponse:
        self._mark_generation(request.client_id, ev)

        async def run() -> str:
            await self._engine.ack(request.client_id, request.message_idem)
            return "acknowledged"

        success, text = await _guard(run())
        return pb.AcknowledgeResponse(success=success, message=text)

    async def _defer(
        self, request: pb.DeferRequest, context: grpc.aio.ServicerContext[Any, Any], ev: bool
    ) -> pb.DeferResponse:
        self._mark_generation(request.client_id, ev)
        delivery_time = 0

        async def run() -> str:
            nonlocal delivery_time
            delivery_time = await self._engine.defer(
                request.client_id, request.message_idem, request.delay_ms, request.reason
            )
            return "deferred"

        success, text = await _guard(run())
        return pb.DeferResponse(success=success, message=text, delivery_time=delivery_time)

    async def _discard(
        self, request: pb.DiscardRequest, context: grpc.aio.ServicerContext[Any, Any], ev: bool
    ) -> pb.DiscardResponse:
        self._mark_generation(request.client_id, ev)

        async def run() -> str:
            await self._engine.discard(request.client_id, request.message_idem, request.reason)
            return "discarded"

        success, text = await _guard(run())
        return pb.DiscardResponse(success=success, message=text)

    async def _replay(
        self, request: pb.ReplayRequest, context: grpc.aio.ServicerContext[Any, Any], ev: bool
    ) -> pb.ReplayResponse:
        self._mark_generation(request.client_id, ev)
        data = ""

        async def run() -> str:
            nonlocal data
            result = await self._engine.replay(request.client_id, request.message_idem)
            data = replay_message_data(result, user_agent=_user_agent(context), event_names=ev)
            return "replayed"

        success, text = await _guard(run())
        return pb.ReplayResponse(success=success, message=text, message_data=data)

    async def _pause(
        self, request: pb.PauseRequest, context: grpc.aio.ServicerContext[Any, Any], ev: bool
    ) -> pb.PauseResponse:
        self._mark_generation(request.client_id, ev)

        async def run() -> str:
            self._engine.pause(request.client_id, request.message_name, request.reason)
            return "paused"

        success, text = await _guard(run())
        return pb.PauseResponse(success=success, message=text)

    async def _continue(
        self, request: pb.ContinueRequest, context: grpc.aio.ServicerContext[Any, Any], ev: bool
    ) -> pb.ContinueResponse:
        self._mark_generation(request.client_id, ev)

        async def run() -> str:
            self._engine.resume(request.client_id, request.message_name)
            return "continued"

        success, text = await _guard(run())
        return pb.ContinueResponse(success=success, message=text)

    async def _extend(
        self, request: pb.ExtendRequest, context: grpc.aio.ServicerContext[Any, Any], _: bool
    ) -> pb.ExtendResponse:
        deadline = 0

        async def run() -> str:
            nonlocal deadline
            deadline = await self._engine.extend(request.client_id, request.message_idem)
            return "extended"

        success, text = await _guard(run())
        return pb.ExtendResponse(success=success, message=text, deadline=deadline)

    async def _release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext[Any, Any], _: bool
    ) -> pb.ReleaseResponse:
        visible = 0

        async def run() -> str:
            nonlocal visible
            when = await self._engine.release(
                request.client_id, request.message_idem, request.reason
            )
            if when is None:
                return "dead-lettered"
            visible = when
            return "released"

        success, text = await _guard(run())
        return pb.ReleaseResponse(success=success, message=text, delivery_time=visible)

    # ------------------------------------------------------------------ streams

    async def _subscribe(
        self,
        request: pb.SubscribeRequest | _Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.MessageStreamResponse]:
        user_agent = _user_agent(context)
        if isinstance(request, _Undecodable):
            if not _is_grpc_js(user_agent):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return
        client = self._clients.get(request.client_id)
        try:
            if client is None or client.closed:
                raise ServiceError.unauthenticated(f"{UNKNOWN_SESSION}: connect first")
            self._engine.subscribe(request.client_id, request.message_name)
        except ServiceError as exc:
            # A grpc-js client crashes on any error status (PROTOCOL.md §2.5
            # rule 6): end its stream with OK instead.
            if not _is_grpc_js(user_agent):
                await context.abort(_STATUS[exc.code], exc.message)
            return
        if client is None:  # unreachable: the check above raised
            return
        stream = _Stream(request.message_name)
        client.streams.append(stream)
        try:
            # Headers go out at once so that clients waiting for the stream
            # to be accepted need not wait for the first message.
            await context.send_initial_metadata(())
            self._engine.routes_changed(client.client_id)
            while True:
                delivery = await stream.queue.get()
                if delivery is None:
                    return
                yield pb.MessageStreamResponse(
                    message_idem=delivery.idem,
                    message_name=delivery.name,
                    payload=delivery.payload,
                    partition_block=delivery.block,
                    metadata=delivery.metadata,
                    sender=delivery.sender,
                    attempt=delivery.attempt,
                )
        finally:
            self._stream_closed(client, stream)

    def _stream_closed(self, client: _Client, stream: _Stream) -> None:
        was_oldest = bool(client.streams) and client.streams[0] is stream
        if stream in client.streams:
            client.streams.remove(stream)
        if client.closed:
            self._clients.pop(client.client_id, None)
            return
        if was_oldest and client.oldest_stream_only:
            # A grpc-js client reads only its oldest stream: when that ends the
            # client is gone (PROTOCOL.md §2.5 rule 5).
            client.close()
            self._clients.pop(client.client_id, None)
            self._engine.disconnect(client.client_id)
            return
        self._engine.routes_changed(client.client_id)


async def _guard(call: Awaitable[str]) -> tuple[bool, str]:
    """Run one engine call; a refusal becomes ``(False, reason)``."""
    try:
        return True, await call
    except ServiceError as exc:
        return False, exc.message
    except Exception:  # isolation boundary: a bug must not become a retryable status
        log.exception("request failed")
        return False, "internal error"
