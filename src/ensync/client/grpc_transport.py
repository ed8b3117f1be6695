"""The SDK's gRPC transport (grpcio, asyncio API).

One channel per connection; one Subscribe stream per subscribed name, read
by a task this transport owns. The channel announces itself with an
``ensync-python/<version>`` user agent so the engine sends Replay data in
the JSON form (the bare-payload form is kept for ``grpc-python`` clients,
PROTOCOL.md §2.7).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync._version import __version__
from ensync.client.limiter import CallLimiter, LimiterStatistics
from ensync.client.session import (
    SUBSCRIPTION_CREDIT,
    SessionObserving,
    SessionStream,
    open_grpc_session,
)
from ensync.client.transport import (
    ConnectInfo,
    Delivery,
    LostCallback,
    WireReplay,
    digits,
)
from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.records import from_replay_json, from_stream_response
from ensync.protocol.urls import EngineUrl

__all__ = ["USER_AGENT", "GrpcClientTransport"]

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

# Unary calls on the wire at once when the engine does not say how many
# streams a connection may open: below HTTP/2's recommended minimum of 100.
DEFAULT_MAX_IN_FLIGHT = 64
# Streams kept free for heartbeats (which bypass the limiter) and for
# subscriptions opened while calls are in flight.
_RESERVED_STREAMS = 8
_REFUSED_RETRY_S = (0.005, 0.02, 0.05, 0.1, 0.25)


class _StillRefusedError(Exception):
    """The engine kept refusing a call's stream until its timeout."""


def _refused(exc: grpc.aio.AioRpcError) -> bool:
    """The engine refused the stream (HTTP/2 REFUSED_STREAM): it never saw the
    request, so sending it again is always safe (RFC 9113 §8.7)."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = exc.details() or ""
    return "REFUSED_STREAM" in details or "error code 7)" in details


def max_in_flight(server_config: dict[str, str] | Any) -> int:
    """How many unary calls to keep on the wire, from the engine's advertised
    ``max_concurrent_streams`` less the streams its subscriptions may hold."""
    streams = str(server_config.get("max_concurrent_streams", ""))
    subscriptions = str(server_config.get("max_subscriptions_per_client", ""))
    if not streams.isdigit():
        return DEFAULT_MAX_IN_FLIGHT
    reserved = int(subscriptions) if subscriptions.isdigit() else 0
    return max(1, int(streams) - reserved - _RESERVED_STREAMS)


class GrpcClientTransport(SessionObserving):
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
        self._timeout = call_timeout_s
        self._client_id = ""
        self._streams: dict[str, tuple[grpc.aio.UnaryStreamCall[Any, Any], asyncio.Task[None]]] = {}
        self._lost: LostCallback | None = None
        self._closed = False
        self._lost_reported = False
        self._limiter = CallLimiter(DEFAULT_MAX_IN_FLIGHT)
        # ensync's batched session stream, when the engine has one (session.py).
        self._batched: SessionStream | None = None
        self._delivers: dict[str, Callable[[Delivery], None]] = {}
        self.use_session = True
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
        self._ack = unary("AcknowledgeMessage", pb.AcknowledgeResponse)
        self._defer = unary("DeferMessage", pb.DeferResponse)
        self._discard = unary("DiscardMessage", pb.DiscardResponse)
        self._replay = unary("ReplayMessage", pb.ReplayResponse)
        self._pause = unary("PauseMessages", pb.PauseResponse)
        self._continue = unary("ContinueMessages", pb.ContinueResponse)
        self._extend = unary("ExtendMessage", pb.ExtendResponse)
        self._release = unary("ReleaseMessage", pb.ReleaseResponse)
        self._subscribe: grpc.aio.UnaryStreamMultiCallable[Any, Any] = ch.unary_stream(
            _SERVICE + "Subscribe",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=pb.MessageStreamResponse.FromString,
        )

    @property
    def client_id(self) -> str:
        return self._client_id

    def on_lost(self, callback: LostCallback) -> None:
        self._lost = callback

    def statistics(self) -> LimiterStatistics:
        """Calls on the wire and calls waiting for a free stream."""
        return self._limiter.statistics()

    # ------------------------------------------------------------------ calls

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

    async def connect(self, app_key: str) -> ConnectInfo:
        response = await self._call(
            self._connect,
            pb.ConnectRequest(access_key=app_key),
            errors.EnSyncAuthError,
            limited=False,
        )
        if not response.success:
            raise errors.EnSyncAuthError(f"Authentication failed: {response.error_message}")
        self._client_id = response.client_id
        self._limiter.resize(max_in_flight(response.server_config))
        if self.use_session:
            self._batched = await open_grpc_session(
                self._channel,
                self._client_id,
                timeout_s=self._timeout,
                route=self._delivers.get,
                lost=self._report_lost,
            )
        config = response.server_config
        return ConnectInfo(
            response.client_id,
            response.client_hash,
            digits(config.get("ack_deadline_ms", "")),
            digits(config.get("max_payload_bytes", "")),
            config.get("app_id") or None,
        )

    async def heartbeat(self) -> None:
        response = await self._call(
            self._heartbeat,
            pb.HeartbeatRequest(client_id=self._client_id),
            errors.EnSyncConnectionError,
            # Liveness must not queue behind a burst of publishes.
            limited=False,
        )
        if not response.success:
            raise errors.EnSyncConnectionError("the engine no longer knows this client")

    async def publish(
        self,
        name: str,
        recipient: str,
        payload: str,
        metadata: str,
        payload_metadata: str | None,
    ) -> str:
        request = pb.PublishMessageRequest(
            client_id=self._client_id,
            message_name=name,
            payload=payload,
            delivery_to=recipient,
            metadata=metadata,
        )
        if self._batched is not None:
            return await self._batched.publish_checked(
                name, recipient, payload, metadata, payload_metadata
            )
        if payload_metadata is not None:
            request.payload_metadata = payload_metadata
        response = await self._call(self._publish, request, errors.EnSyncPublishError)
        if not response.success:
            raise errors.EnSyncPublishError(response.error_message)
        return str(response.message_idem)

    async def subscribe(self, name: str, deliver: Callable[[Delivery], None]) -> None:
        if self._closed:
            raise errors.EnSyncConnectionError("the connection is closed")
        call = self._subscribe(pb.SubscribeRequest(client_id=self._client_id, message_name=name))
        # Wait for the engine to accept the stream (or refuse it) so that a
        # bad name or session fails here, not later in the reader task.
        try:
            await call.wait_for_connection()
        except grpc.aio.AioRpcError as exc:
            raise self._translate(exc, errors.EnSyncSubscriptionError) from exc
        task = asyncio.get_running_loop().create_task(
            self._read(name, call, deliver), name=f"ensync-stream-{name}"
        )
        old = self._streams.pop(name, None)
        self._streams[name] = (call, task)
        self._delivers[name] = deliver
        if self._batched is not None and self._batched.deliveries:
            self._batched.credit(name, SUBSCRIPTION_CREDIT)
        if old is not None:
            old[0].cancel()

    async def _read(
        self,
        name: str,
        call: grpc.aio.UnaryStreamCall[Any, Any],
        deliver: Callable[[Delivery], None],
    ) -> None:
        try:
            async for item in call:
                deliver(
                    from_stream_response(
                        item, name=name, received_at_ms=time.time_ns() // 1_000_000
                    )
                )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.CANCELLED and self._closed:
                return
            if (
                exc.code() == grpc.StatusCode.CANCELLED
                and self._streams.get(name, (None,))[0] is not call
            ):
                return
            self._report_lost(self._translate(exc, errors.EnSyncSubscriptionError))
            return
        except asyncio.CancelledError:
            raise
        # The engine ended the stream without an error: our session is over.
        current = self._streams.get(name)
        if not self._closed and current is not None and current[0] is call:
            self._report_lost(errors.EnSyncConnectionError(f"the engine ended the {name} stream"))

    def _report_lost(self, exc: BaseException) -> None:
        if self._closed or self._lost_reported:
            return
        self._lost_reported = True
        if self._lost is not None:
            self._lost(exc)

    async def unsubscribe(self, name: str) -> None:
        response = await self._call(
            self._unsubscribe,
            pb.UnsubscribeRequest(client_id=self._client_id, message_name=name),
            errors.EnSyncSubscriptionError,
        )
        if not response.success:
            raise errors.EnSyncSubscriptionError(response.message)
        self._delivers.pop(name, None)
        entry = self._streams.pop(name, None)
        if entry is not None:
            entry[0].cancel()

    def consumed(self, name: str) -> None:
        if self._batched is not None and self._batched.deliveries and name in self._delivers:
            self._batched.credit(name, 1)

    def ack_soon(
        self, name: str, idem: str, block: int, failed: Callable[[errors.EnSyncError], None]
    ) -> asyncio.Future[Any] | None:
        return self._batched.ack_soon(name, idem, failed) if self._batched is not None else None

    async def ack(self, name: str, idem: str, block: int) -> None:
        if self._batched is not None:
            await self._batched.ack(name, idem)
            return
        request = pb.AcknowledgeRequest(
            client_id=self._client_id, message_idem=idem, message_name=name, partition_block=block
        )
        response = await self._call(self._ack, request, errors.EnSyncAckError)
        if not response.success:
            raise errors.EnSyncAckError(response.message)

    async def defer(self, name: str, idem: str, delay_ms: int, reason: str) -> int:
        if self._batched is not None:
            return await self._batched.defer(name, idem, delay_ms, reason)
        request = pb.DeferRequest(
            client_id=self._client_id,
            message_idem=idem,
            message_name=name,
            delay_ms=delay_ms,
            reason=reason,
        )
        response = await self._call(self._defer, request, errors.EnSyncDeferError)
        if not response.success:
            raise errors.EnSyncDeferError(response.message)
        return int(response.delivery_time)

    async def discard(self, name: str, idem: str, reason: str) -> None:
        if self._batched is not None:
            await self._batched.discard(name, idem, reason)
            return
        request = pb.DiscardRequest(
            client_id=self._client_id, message_idem=idem, message_name=name, reason=reason
        )
        response = await self._call(self._discard, request, errors.EnSyncDiscardError)
        if not response.success:
            raise errors.EnSyncDiscardError(response.message)

    async def extend(self, name: str, idem: str) -> int:
        if self._batched is not None:
            return await self._batched.extend(name, idem)
        request = pb.ExtendRequest(client_id=self._client_id, message_idem=idem, message_name=name)
        response = await self._call(self._extend, request, errors.EnSyncAckError)
        if not response.success:
            raise errors.EnSyncAckError(response.message)
        return int(response.deadline)

    async def release(self, name: str, idem: str, reason: str) -> int | None:
        if self._batched is not None:
            return await self._batched.release(name, idem, reason)
        request = pb.ReleaseRequest(
            client_id=self._client_id, message_idem=idem, message_name=name, reason=reason
        )
        response = await self._call(self._release, request, errors.EnSyncAckError)
        if not response.success:
            raise errors.EnSyncAckError(response.message)
        return int(response.delivery_time) if response.message != "dead-lettered" else None

    async def replay(self, name: str, idem: str) -> WireReplay:
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
        request = pb.PauseRequest(client_id=self._client_id, message_name=name, reason=reason)
        response = await self._call(self._pause, request, errors.EnSyncPauseError)
        if not response.success:
            raise errors.EnSyncPauseError(response.message)

    async def resume(self, name: str) -> None:
        request = pb.ContinueRequest(client_id=self._client_id, message_name=name)
        response = await self._call(self._continue, request, errors.EnSyncContinueError)
        if not response.success:
            raise errors.EnSyncContinueError(response.message)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._limiter.close(errors.EnSyncConnectionError("the connection was closed"))
        if self._batched is not None:
            await self._batched.close()
        streams = list(self._streams.values())
        self._streams.clear()
        for call, _ in streams:
            call.cancel()
        for _, task in streams:
            task.cancel()
        if streams:
            await asyncio.gather(*(task for _, task in streams), return_exceptions=True)
        await self._channel.close()
