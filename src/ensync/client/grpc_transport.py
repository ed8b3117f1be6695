"""The SDK's gRPC transport (grpcio, asyncio API).

One channel per connection. With ensync's batched session (the
``EnSyncSession/Session`` method, `ensync.client.grpc_link`) publishes, settlements
and deliveries travel on it; without one, each is a unary call of
``EnSyncService``. Either way there is one Subscribe stream per subscribed
name, read by a task this transport owns. The channel announces itself with
an ``ensync-python/<version>`` user agent so the engine sends Replay data in
the JSON form (the bare-payload form is kept for ``grpc-python`` clients,
PROTOCOL.md §2.7).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync._version import __version__
from ensync.client.grpc_link import open_grpc_session
from ensync.client.session import SessionStream
from ensync.client.tasks import TaskOwner
from ensync.client.transport import ConnectInfo, SettleKind, Settlement, WireReplay, digits
from ensync.client.wire import DEFAULT_MAX_IN_FLIGHT, Authenticated, WireTransport
from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.records import from_replay_json, from_stream_response
from ensync.protocol.urls import EngineUrl

__all__ = ["DEFAULT_MAX_IN_FLIGHT", "USER_AGENT", "GrpcClientTransport", "max_in_flight"]

log = logging.getLogger(__name__)

USER_AGENT = f"ensync-python/{__version__}"
_SERVICE = "/ensync.EnSyncService/"

# Statuses that mean "the link", not "the request": the call may succeed on
# a new connection.
_LINK_STATUSES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
}

# Streams kept free for heartbeats (which bypass the limiter) and for
# subscriptions opened while calls are in flight.
_RESERVED_STREAMS = 8
_REFUSED_RETRY_S = (0.005, 0.02, 0.05, 0.1, 0.25)


class _StillRefusedError(Exception):
    """The engine kept refusing a call's stream until its timeout."""


def _refused(exc: grpc.aio.AioRpcError) -> bool:
    """Whether the engine refused the stream (HTTP/2 REFUSED_STREAM).

    It then never saw the request, so sending it again is always safe
    (RFC 9113 §8.7).
    """
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = exc.details() or ""
    return "REFUSED_STREAM" in details or "error code 7)" in details


def max_in_flight(server_config: dict[str, str] | Any) -> int:
    """How many unary calls to keep on the wire.

    The engine's advertised ``max_concurrent_streams``, less the streams its
    subscriptions may hold.
    """
    streams = str(server_config.get("max_concurrent_streams", ""))
    subscriptions = str(server_config.get("max_subscriptions_per_client", ""))
    if not streams.isdigit():
        return DEFAULT_MAX_IN_FLIGHT
    reserved = int(subscriptions) if subscriptions.isdigit() else 0
    return max(1, int(streams) - reserved - _RESERVED_STREAMS)


@dataclass(frozen=True, slots=True)
class _UnarySettle:
    """How one settlement kind is sent without the session, and what it answers."""

    method: str
    response: Any
    request: Callable[[str, Settlement], Any]
    answer: Callable[[Any], int | None]


_SETTLES = {
    SettleKind.ACK: _UnarySettle(
        "AcknowledgeMessage",
        pb.AcknowledgeResponse,
        lambda client, s: pb.AcknowledgeRequest(
            client_id=client, message_idem=s.idem, message_name=s.name, partition_block=s.block
        ),
        lambda response: None,
    ),
    SettleKind.DEFER: _UnarySettle(
        "DeferMessage",
        pb.DeferResponse,
        lambda client, s: pb.DeferRequest(
            client_id=client,
            message_idem=s.idem,
            message_name=s.name,
            delay_ms=s.delay_ms,
            reason=s.reason,
        ),
        lambda response: int(response.delivery_time),
    ),
    SettleKind.DISCARD: _UnarySettle(
        "DiscardMessage",
        pb.DiscardResponse,
        lambda client, s: pb.DiscardRequest(
            client_id=client, message_idem=s.idem, message_name=s.name, reason=s.reason
        ),
        lambda response: None,
    ),
    SettleKind.EXTEND: _UnarySettle(
        "ExtendMessage",
        pb.ExtendResponse,
        lambda client, s: pb.ExtendRequest(
            client_id=client, message_idem=s.idem, message_name=s.name
        ),
        lambda response: int(response.deadline),
    ),
    SettleKind.RELEASE: _UnarySettle(
        "ReleaseMessage",
        pb.ReleaseResponse,
        lambda client, s: pb.ReleaseRequest(
            client_id=client, message_idem=s.idem, message_name=s.name, reason=s.reason
        ),
        lambda response: (
            int(response.delivery_time) if response.message != "dead-lettered" else None
        ),
    ),
}


class GrpcClientTransport(WireTransport):
    """A `ClientTransport` over gRPC.

    Args:
        url: the parsed engine URL (``grpc://`` or ``grpcs://``).
        call_timeout_s: deadline of every unary call.
        root_certificates: PEM bytes of a CA to trust instead of the system's.
    """

    def __init__(
        self,
        url: EngineUrl,
        *,
        call_timeout_s: float = 30.0,
        root_certificates: bytes | None = None,
    ) -> None:
        super().__init__(call_timeout_s=call_timeout_s)
        options: list[tuple[str, Any]] = [
            ("grpc.primary_user_agent", USER_AGENT),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.max_send_message_length", 16 * 1024 * 1024),
            ("grpc.keepalive_time_ms", 20_000),
            ("grpc.keepalive_timeout_ms", 10_000),
            # A connection of its own: a shared one carries gRPC's back-off
            # from earlier failures, so a reconnect attempt made after the
            # engine is back would fail without trying.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        if url.secure:
            creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self._channel = grpc.aio.secure_channel(url.target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(url.target, options=options)
        # One Subscribe stream per name, each read by a task of ours.
        self._streams: dict[str, grpc.aio.UnaryStreamCall[Any, Any]] = {}
        self._tasks = TaskOwner()
        ch = self._channel

        def unary(method: str, resp: Any) -> grpc.aio.UnaryUnaryMultiCallable[Any, Any]:
            return ch.unary_unary(
                _SERVICE + method,
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=resp.FromString,
            )

        self._connect = unary("Connect", pb.ConnectResponse)
        self._heartbeat = unary("Heartbeat", pb.HeartbeatResponse)
        self._publish = unary("PublishMessage", pb.PublishMessageResponse)
        self._unsubscribe = unary("Unsubscribe", pb.UnsubscribeResponse)
        self._settles = {kind: unary(how.method, how.response) for kind, how in _SETTLES.items()}
        self._replay = unary("ReplayMessage", pb.ReplayResponse)
        self._pause = unary("PauseMessages", pb.PauseResponse)
        self._continue = unary("ContinueMessages", pb.ContinueResponse)
        self._subscribe: grpc.aio.UnaryStreamMultiCallable[Any, Any] = ch.unary_stream(
            _SERVICE + "Subscribe",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.MessageStreamResponse.FromString,
        )

    # ------------------------------------------------------------------ unary calls

    async def _call(
        self,
        multicallable: grpc.aio.UnaryUnaryMultiCallable[Any, Any],
        request: Any,
        error: type[errors.EnSyncError],
        *,
        limited: bool = True,
    ) -> Any:
        if self._closed:
            raise errors.EnSyncConnectionError("the connection is closed")
        if not limited:
            return await self._send(multicallable, request, error)
        async with self._limiter.slot():
            return await self._send(multicallable, request, error)

    async def _send(
        self,
        multicallable: grpc.aio.UnaryUnaryMultiCallable[Any, Any],
        request: Any,
        error: type[errors.EnSyncError],
    ) -> Any:
        try:
            response = await self._unary_with_retry(multicallable, request)
        except _StillRefusedError:
            raise error(
                f"the engine refused the call for {self._timeout:g} s: "
                "too many calls in progress on this connection"
            ) from None
        except grpc.aio.AioRpcError as exc:
            translated = self._translate(exc, error)
            if isinstance(translated, errors.EnSyncConnectionError):
                self._report_lost(translated)
            raise translated from exc
        except asyncio.CancelledError:
            # Closing the channel (a reconnect replacing this transport)
            # cancels the calls on it; the caller was not cancelled itself.
            task = asyncio.current_task()
            if self._closed and task is not None and task.cancelling() == 0:
                raise errors.EnSyncConnectionError("the connection was replaced") from None
            raise
        refusal = getattr(response, "message", "") or getattr(response, "error_message", "")
        if not response.success and refusal.startswith(UNKNOWN_SESSION):
            # The engine no longer knows this session (it restarted, or expired
            # it): the link is useless even though grpc reconnected it.
            lost = errors.EnSyncConnectionError(f"the engine dropped this session: {refusal}")
            self._report_lost(lost)
            raise lost
        return response

    async def _unary_with_retry(
        self, multicallable: grpc.aio.UnaryUnaryMultiCallable[Any, Any], request: Any
    ) -> Any:
        # A refused stream is the engine saying "not now", not a broken link:
        # it is sent again, with growing pauses, within the call timeout.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        attempt = 0
        while True:
            try:
                return await multicallable(request, timeout=max(0.001, deadline - loop.time()))
            except grpc.aio.AioRpcError as exc:
                if not _refused(exc):
                    raise
                pause_s = _REFUSED_RETRY_S[min(attempt, len(_REFUSED_RETRY_S) - 1)]
                if loop.time() + pause_s >= deadline:
                    raise _StillRefusedError from exc
            attempt += 1
            await asyncio.sleep(pause_s)

    def _translate(
        self, exc: grpc.aio.AioRpcError, error: type[errors.EnSyncError]
    ) -> errors.EnSyncError:
        code = exc.code()
        details = exc.details() or code.name
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return errors.EnSyncTimeoutError(f"the engine did not answer in {self._timeout:g} s")
        if code in _LINK_STATUSES:
            return errors.EnSyncConnectionError(f"connection to the engine failed: {details}")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return errors.EnSyncAuthError(details)
        return error(details)

    # ------------------------------------------------------------------ WireTransport

    async def _authenticate(self, app_key: str) -> Authenticated:
        response = await self._call(
            self._connect,
            pb.ConnectRequest(access_key=app_key),
            errors.EnSyncAuthError,
            limited=False,
        )
        if not response.success:
            raise errors.EnSyncAuthError(f"Authentication failed: {response.error_message}")
        config = response.server_config
        info = ConnectInfo(
            response.client_id,
            response.client_hash,
            digits(config.get("ack_deadline_ms", "")),
            digits(config.get("max_payload_bytes", "")),
            config.get("app_id") or None,
        )
        # Every ensync engine may have the session: asking is how to know.
        return Authenticated(info, max_in_flight(config), offers_session=True)

    async def _open_session(self) -> SessionStream | None:
        return await open_grpc_session(self._channel, self._start_session)

    async def _publish_unbatched(
        self, name: str, recipient: str, payload: str, metadata: str, payload_metadata: str | None
    ) -> str:
        request = pb.PublishMessageRequest(
            client_id=self._client_id,
            message_name=name,
            payload=payload,
            delivery_to=recipient,
            metadata=metadata,
        )
        if payload_metadata is not None:
            request.payload_metadata = payload_metadata
        response = await self._call(self._publish, request, errors.EnSyncPublishError)
        if not response.success:
            raise errors.EnSyncPublishError(response.error_message)
        return str(response.message_idem)

    async def _settle_unbatched(self, settlement: Settlement) -> int | None:
        how = _SETTLES[settlement.kind]
        request = how.request(self._client_id, settlement)
        response = await self._call(self._settles[settlement.kind], request, settlement.error)
        if not response.success:
            raise settlement.error(response.message)
        return how.answer(response)

    async def _subscribe_wire(self, name: str) -> None:
        call = self._subscribe(pb.SubscribeRequest(client_id=self._client_id, message_name=name))
        # Wait for the engine to accept the stream (or refuse it) so that a
        # bad name or session fails here, not later in the reader task.
        try:
            await call.wait_for_connection()
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, errors.EnSyncSubscriptionError) from exc
        old = self._streams.pop(name, None)
        self._streams[name] = call
        self._tasks.start(self._read(name, call), name=f"ensync-stream-{name}")
        if old is not None:
            old.cancel()

    async def _read(self, name: str, call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
        try:
            async for item in call:
                deliver = self._routes.get(name)
                if deliver is not None:
                    deliver(
                        from_stream_response(
                            item, name=name, received_at_ms=time.time_ns() // 1_000_000
                        )
                    )
        except grpc.aio.AioRpcError as exc:
            replaced = self._streams.get(name) is not call
            if exc.code() == grpc.StatusCode.CANCELLED and (self._closed or replaced):
                return
            self._report_lost(self._translate(exc, errors.EnSyncSubscriptionError))
            return
        # The engine ended the stream without an error: our session is over.
        if not self._closed and self._streams.get(name) is call:
            self._report_lost(errors.EnSyncConnectionError(f"the engine ended the {name} stream"))

    async def _unsubscribe_wire(self, name: str) -> None:
        response = await self._call(
            self._unsubscribe,
            pb.UnsubscribeRequest(client_id=self._client_id, message_name=name),
            errors.EnSyncSubscriptionError,
        )
        if not response.success:
            raise errors.EnSyncSubscriptionError(response.message)
        call = self._streams.pop(name, None)
        if call is not None:
            call.cancel()  # its reader ends by itself

    async def _close_wire(self) -> None:
        for call in self._streams.values():
            call.cancel()
        self._streams.clear()
        await self._tasks.close()
        await self._channel.close()

    # ------------------------------------------------------------------ calls

    async def heartbeat(self) -> None:
        """Prove liveness; raises EnSyncConnectionError if the session is gone."""
        response = await self._call(
            self._heartbeat,
            pb.HeartbeatRequest(client_id=self._client_id),
            errors.EnSyncConnectionError,
            # Liveness must not queue behind a burst of publishes.
            limited=False,
        )
        if not response.success:
            raise errors.EnSyncConnectionError("the engine no longer knows this client")

    async def replay(self, name: str, idem: str) -> WireReplay:
        """Read a message of the app back by idem."""
        request = pb.ReplayRequest(client_id=self._client_id, message_idem=idem, message_name=name)
        response = await self._call(self._replay, request, errors.EnSyncReplayError)
        if not response.success:
            raise errors.EnSyncReplayError(response.message)
        try:
            message, info = from_replay_json(response.message_data, name=name, idem=idem)
        except ValueError as exc:
            raise errors.EnSyncReplayError("the engine's replay data is malformed") from exc
        return WireReplay(message, info)

    async def pause(self, name: str, reason: str) -> None:
        """No new deliveries of ``name`` until `resume`."""
        request = pb.PauseRequest(client_id=self._client_id, message_name=name, reason=reason)
        response = await self._call(self._pause, request, errors.EnSyncPauseError)
        if not response.success:
            raise errors.EnSyncPauseError(response.message)

    async def resume(self, name: str) -> None:
        """Undo `pause`."""
        request = pb.ContinueRequest(client_id=self._client_id, message_name=name)
        response = await self._call(self._continue, request, errors.EnSyncContinueError)
        if not response.success:
            raise errors.EnSyncContinueError(response.message)
