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
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from ensync._proto import ensync_pb2 as pb
from ensync.protocol.agents import is_go_client, reads_oldest_stream_only
from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.records import to_stream_response
from ensync.server.core.calls import (
    Subscribe,
)
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.validation import largest_request
from ensync.server.openfiles import max_connections
from ensync.server.runtime.engine import Engine
from ensync.server.transports.go_clients import GoClientWatch
from ensync.server.transports.grpc_clients import Client, Stream
from ensync.server.transports.grpc_verbs import VERBS, Call, Verb
from ensync.server.transports.listen import bind_failure
from ensync.server.transports.session import (
    SESSION_SERVICE,
    Refusal,
    SessionOutbox,
    serve_session,
)

__all__ = ["GrpcTransport"]

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


class _SessionPeer:
    """The session's client over the ``EnSyncSession/Session`` method."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def send(self, frame: pb.ServerFrame) -> None:
        await self._context.write(frame)

    async def refuse(self, why: Refusal, text: str) -> NoReturn:
        code = (
            grpc.StatusCode.INVALID_ARGUMENT
            if why is Refusal.NO_HELLO
            else grpc.StatusCode.UNAUTHENTICATED
        )
        await self._context.abort(code, text)
        raise AssertionError("abort() returned")  # pragma: no cover


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
        session: bool = True,
    ) -> None:
        self._engine = engine
        self._ops = engine.operations
        self._address = address
        self._credentials = credentials
        # Sized for the largest envelope an allowed payload makes, so that
        # grpcio never answers RESOURCE_EXHAUSTED for an allowed publish.
        limit = max_message_bytes or largest_request(
            engine.config.max_payload_bytes, engine.config.max_metadata_bytes
        )
        self._message_limit = limit
        self.max_streams = max(200, engine.config.max_subscriptions_per_client + 100)
        self._server = grpc.aio.server(
            options=[
                # grpcio shares a port with any other grpcio server by default:
                # a second engine on the same --grpc would take half the
                # clients into another store. A taken port is an error.
                ("grpc.so_reuseport", 0),
                # A connection that has not sent the HTTP/2 preface and its
                # settings in time is closed; past the cap, new connections
                # are closed at once (grpcio counts them; it has no cap per
                # address).
                ("grpc.server_handshake_timeout_ms", engine.config.handshake_timeout_ms),
                (
                    "grpc.max_allowed_incoming_connections",
                    max_connections(engine.config.max_connections),
                ),
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
        self._clients: dict[str, Client] = {}
        self._go = GoClientWatch(self._client_gone)
        handlers = [self._handlers()]
        if session:  # ensync's own batched stream; official clients never call it
            handlers.append(self._session_handlers())
        self._server.add_generic_rpc_handlers(tuple(handlers))
        self.port = 0

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (useful with port 0)."""
        try:
            if self._credentials is None:
                self.port = self._server.add_insecure_port(self._address)
            else:
                self.port = self._server.add_secure_port(self._address, self._credentials)
        except RuntimeError as exc:  # grpcio's only word for a failed bind
            host, _, port = self._address.rpartition(":")
            raise bind_failure("gRPC", "--grpc", host.strip("[]"), int(port), exc) from exc
        await self._server.start()
        return self.port

    async def stop(self, grace_s: float = 1.0) -> None:
        """Refuse new calls at once, end every stream cleanly (status OK), let
        unary calls in progress finish (up to ``grace_s``), then close."""
        stopping = asyncio.get_running_loop().create_task(self._server.stop(grace_s))
        await asyncio.sleep(0)  # let stop() refuse new calls before streams end
        self._go.close()
        for client in list(self._clients.values()):
            client.close()
        await stopping

    # ------------------------------------------------------------------ wiring

    def _handlers(self) -> grpc.GenericRpcHandler:
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
            "Connect": self._unary(pb.ConnectRequest, self._connect),
            "Heartbeat": self._unary(pb.HeartbeatRequest, self._heartbeat),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self._subscribe,
                request_deserializer=_decoder(pb.SubscribeRequest),
                response_serializer=pb.MessageStreamResponse.SerializeToString,
            ),
        }
        for verb in VERBS:
            for method, event in verb.methods():
                handlers[method] = self._unary(verb.request, self._verb_handler(verb), event)
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _session_handlers(self) -> grpc.GenericRpcHandler:
        session = grpc.stream_stream_rpc_method_handler(
            self._session,
            request_deserializer=_decoder(pb.ClientFrame),
            response_serializer=pb.ServerFrame.SerializeToString,
        )
        return grpc.method_handlers_generic_handler(SESSION_SERVICE, {"Session": session})

    async def _session(
        self,
        frames: AsyncIterator[pb.ClientFrame | _Undecodable],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        async def checked() -> AsyncIterator[pb.ClientFrame]:
            async for frame in frames:
                if isinstance(frame, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, frame.reason)
                    return
                yield frame

        await serve_session(
            self._engine,
            checked(),
            _SessionPeer(context),
            self._attach_session,
            self._detach_session,
            max_frame_bytes=self._message_limit - 64 * 1024,
            leave=self._client_gone,
        )

    def _attach_session(self, client_id: str, outbox: SessionOutbox) -> bool:
        client = self._clients.get(client_id)
        if client is None or client.closed or not self._ops.has_session(client_id):
            return False
        if client.session is not None:
            client.session.close()  # a newer session stream replaces the older
        client.session = outbox
        self._ops.routes_changed(client_id)
        return True

    def _detach_session(self, client_id: str, outbox: SessionOutbox) -> None:
        client = self._clients.get(client_id)
        if client is not None and client.session is outbox:
            client.session = None
            self._ops.routes_changed(client_id)

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
            client = await self._known(getattr(request, "client_id", ""), context)
            if client is not None and client.go:
                self._go.saw_call(client.client_id)
            return await behaviour(request, context, event)

        return grpc.unary_unary_rpc_method_handler(
            handle,
            request_deserializer=_decoder(request_type),
            response_serializer=lambda message: message.SerializeToString(),
        )

    async def _known(
        self, client_id: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Client | None:
        """The client with this id; one another node connected is taken over
        (a load balancer moved it here), if the store is shared."""
        client = self._clients.get(client_id)
        if client is not None or not client_id:
            return client
        client = Client(client_id=client_id, user_agent=_user_agent(context))
        if not await self._ops.adopt(client_id, client):
            return None
        return self._clients.setdefault(client_id, client)

    def _verb_handler(
        self, verb: Verb
    ) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any], bool], Awaitable[ProtoMessage]]:
        async def handle(
            request: Any, context: grpc.aio.ServicerContext[Any, Any], event: bool
        ) -> ProtoMessage:
            if event:
                # An Event-generation call marks an older grpc-js client
                # (PROTOCOL.md §2.5): route per name for it from now on.
                client = self._clients.get(request.client_id)
                if client is not None:
                    client.event_generation = True
            call = Call(self._ops, request, _user_agent(context), event)
            try:
                text, fields = await verb.run(call)
            except ServiceError as exc:
                return verb.response(success=False, message=exc.message)
            except Exception:  # isolation boundary: a bug must not become a retryable status
                log.exception("%s failed", verb.name)
                return verb.response(success=False, message="internal error")
            return verb.response(success=True, message=text, **fields)

        return handle

    # ------------------------------------------------------------------ connect

    async def _connect(
        self, request: pb.ConnectRequest, context: grpc.aio.ServicerContext[Any, Any], _: bool
    ) -> pb.ConnectResponse:
        client = Client(client_id="", user_agent=_user_agent(context))
        try:
            info = await self._ops.connect(request.access_key, client)
        except ServiceError as exc:
            if exc.code is ErrorCode.UNAVAILABLE:
                # Not a refused key: the store failed. A status says "try again".
                await context.abort(grpc.StatusCode.UNAVAILABLE, exc.message)
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
                # The limit on a payload's JSON before encryption; our SDK
                # checks it before sending.
                "max_payload_bytes": str(self._engine.config.max_payload_bytes),
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
        alive = self._ops.heartbeat(request.client_id)
        if not alive:
            self._clients.pop(request.client_id, None)
            self._go.forget(request.client_id)
        return pb.HeartbeatResponse(success=alive)

    # ------------------------------------------------------------------ streams

    async def _subscribe(
        self,
        request: pb.SubscribeRequest | _Undecodable,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.MessageStreamResponse]:
        arrived_s = time.monotonic()
        user_agent = _user_agent(context)
        if isinstance(request, _Undecodable):
            self._ops.refused_subscribe(Subscribe("", ""), request.reason)
            if is_go_client(user_agent):
                await self._go.pace_refusal(arrived_s)
            if not reads_oldest_stream_only(user_agent):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)
            return
        client = await self._known(request.client_id, context)
        call = Subscribe(request.client_id, request.message_name)
        try:
            if client is None or client.closed:
                unknown = f"{UNKNOWN_SESSION}: connect first"
                self._ops.refused_subscribe(call, unknown)
                raise ServiceError.unauthenticated(unknown)
            self._ops.subscribe(call)
        except ServiceError as exc:
            if is_go_client(user_agent):
                # It would subscribe again at once, forever (go_clients.py).
                await self._go.pace_refusal(arrived_s)
            # A grpc-js client crashes on any error status (PROTOCOL.md §2.5
            # rule 6): end its stream with OK instead.
            if not reads_oldest_stream_only(user_agent):
                await context.abort(_STATUS[exc.code], exc.message)
            return
        if client is None:  # unreachable: the check above raised
            return
        if client.go:
            self._go.saw_call(client.client_id)
        stream = Stream(request.message_name)
        client.streams.append(stream)
        cancelled = False
        try:
            # Headers go out at once so that clients waiting for the stream
            # to be accepted need not wait for the first message.
            await context.send_initial_metadata(())
            self._ops.routes_changed(client.client_id)
            while True:
                delivery = await stream.queue.get()
                if delivery is None:
                    return
                yield to_stream_response(delivery)
        except asyncio.CancelledError:
            cancelled = True  # by the client, or by a stopping server
            raise
        finally:
            self._stream_closed(client, stream, cancelled=cancelled)

    def _stream_closed(self, client: Client, stream: Stream, *, cancelled: bool) -> None:
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
            self._ops.gone(client.client_id)
            return
        if client.go:
            session = self._engine.sessions.get(client.client_id)
            held = session is not None and stream.name in session.subscriptions
            self._go.stream_ended(
                client.client_id, streams_left=len(client.streams), unexpected=cancelled and held
            )
        self._ops.routes_changed(client.client_id)

    def _client_gone(self, client_id: str) -> None:
        """A client that said goodbye, or a Go client whose streams all ended."""
        client = self._clients.pop(client_id, None)
        if client is None or client.closed:
            return
        client.close()
        self._ops.gone(client_id)
