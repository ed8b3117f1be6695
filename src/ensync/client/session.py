"""The SDK's side of ensync's batched session (``EnSyncSession/Session``).

Concurrent calls are coalesced: every publish and settlement started in one
turn of the event loop goes out in one frame, and the engine answers in
frames too, carrying deliveries as well when it agreed to. Callers see one
awaitable per call, exactly as with the official calls; only an engine
without the session makes the transport fall back to those.

The frames travel over a `FrameLink`: the ``Session`` method on gRPC
(`open_grpc_session`), binary messages on WebSocket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

import grpc

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync.client.limiter import CallLimiter
from ensync.client.transport import Delivery, Observer
from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.names import matches
from ensync.protocol.records import from_stream_response

__all__ = [
    "SESSION_METHOD",
    "SUBSCRIPTION_CREDIT",
    "FrameLink",
    "SessionObserving",
    "SessionStream",
    "Settled",
    "open_grpc_session",
]

log = logging.getLogger(__name__)

SESSION_METHOD = "/ensync.EnSyncSession/Session"
VERSION = 1
DELIVERIES = "deliveries"
OBSERVE = "observe"
GOODBYE = "goodbye"
# How long `close` waits for the engine's answer to a goodbye. Past it the
# client closes anyway; the engine ends the session when heartbeats stop.
_GOODBYE_WAIT_S = 2.0
# A frame goes out as soon as it holds this many publishes.
_EAGER_FLUSH = 128
# Items the SDK keeps outstanding on one session when the engine does not say.
_DEFAULT_OUTSTANDING = 4096
# Deliveries a subscription lets the engine send ahead on the session; each
# one handed to the subscription's handlers gives one credit back.
SUBSCRIPTION_CREDIT = 512

Settled = pb.SessionSettled


class FrameLink(Protocol):
    """What carries a session's frames.

    A link may also offer ``push_to(sink)``: it then hands every frame read
    (``None`` at the end, an exception if it broke) to ``sink`` itself, and
    the session runs no reader task.
    """

    async def write(self, frame: pb.ClientFrame) -> None:
        """Send one frame; raises `EnSyncConnectionError` if the link broke."""
        ...

    async def read(self) -> pb.ServerFrame | None:
        """The next frame; ``None`` once the engine ended the session; raises
        `EnSyncConnectionError` if the link broke."""
        ...

    def cancel(self) -> None:
        """Stop the link (the session is over)."""
        ...


class _GrpcLink:
    def __init__(self, call: grpc.aio.StreamStreamCall[pb.ClientFrame, pb.ServerFrame]) -> None:
        self._call = call

    async def write(self, frame: pb.ClientFrame) -> None:
        try:
            await self._call.write(frame)
        except grpc.aio.AioRpcError as exc:
            raise errors.EnSyncConnectionError(f"the session broke: {exc.code().name}") from exc
        except asyncio.InvalidStateError:
            raise errors.EnSyncConnectionError("the session ended") from None

    async def read(self) -> pb.ServerFrame | None:
        try:
            frame = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise errors.EnSyncConnectionError(
                f"the session broke: {exc.details() or exc.code().name}"
            ) from exc
        if frame is grpc.aio.EOF:
            return None
        assert isinstance(frame, pb.ServerFrame)  # EOF is the only other value
        return frame

    def cancel(self) -> None:
        self._call.cancel()


async def open_grpc_session(
    channel: grpc.aio.Channel,
    client_id: str,
    *,
    timeout_s: float,
    route: Callable[[str], Callable[[Delivery], None] | None],
    lost: Callable[[BaseException], None],
) -> SessionStream | None:
    """Open a session on the gRPC ``Session`` method; ``None`` if the engine has none.

    Raises:
        EnSyncConnectionError: the engine refused the session or did not answer.
    """
    method: grpc.aio.StreamStreamMultiCallable[pb.ClientFrame, pb.ServerFrame] = (
        channel.stream_stream(
            SESSION_METHOD,
            request_serializer=pb.ClientFrame.SerializeToString,
            response_deserializer=pb.ServerFrame.FromString,
        )
    )
    call = method()
    try:
        return await SessionStream.start(
            _GrpcLink(call), client_id, timeout_s=timeout_s, route=route, lost=lost
        )
    except errors.EnSyncConnectionError as exc:
        cause = exc.__cause__
        if isinstance(cause, grpc.aio.AioRpcError):
            if cause.code() == grpc.StatusCode.UNIMPLEMENTED:
                return None  # an engine without the session: unary calls it is
            raise errors.EnSyncConnectionError(
                f"the engine refused the session: {cause.details() or cause.code().name}"
            ) from cause
        raise


class SessionStream:
    """One open session; create it with `start` (or `open_grpc_session`).

    Args:
        link: what carries the frames.
        timeout_s: how long a call may wait for its answer once sent.
        route: the handler of a message name's deliveries (None: none now).
        lost: called once if the stream breaks (not on `close`).
    """

    def __init__(
        self,
        link: FrameLink,
        welcome: pb.SessionWelcome,
        *,
        timeout_s: float,
        route: Callable[[str], Callable[[Delivery], None] | None],
        lost: Callable[[BaseException], None],
    ) -> None:
        self._link = link
        self.deliveries = DELIVERIES in welcome.capabilities
        self.observing = OBSERVE in welcome.capabilities
        self._says_goodbye = GOODBYE in welcome.capabilities
        # Set while a goodbye waits for its answer: the end is then expected.
        self._leaving: asyncio.Future[None] | None = None
        self._observers: dict[str, Observer] = {}
        self._observes: list[pb.SessionObserve] = []
        frame_bytes = welcome.limits.get("max_frame_bytes", "")
        # Frames go out below the engine's message size limit.
        self._max_frame_bytes = int(frame_bytes) if frame_bytes.isdigit() else 1024 * 1024
        outstanding = welcome.limits.get("max_outstanding", "")
        limit = int(outstanding) // 2 if outstanding.isdigit() else _DEFAULT_OUTSTANDING
        self._limiter = CallLimiter(max(1, limit))
        self._timeout = timeout_s
        self._route = route
        self._lost = lost
        self._seqs = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._deadlines: deque[tuple[float, int]] = deque()
        self._timer: asyncio.TimerHandle | None = None
        self._publishes: list[pb.SessionPublish] = []
        self._settles: list[pb.SessionSettle] = []
        self._credits: dict[str, int] = {}
        self._flush_scheduled = False
        self._outbox: asyncio.Queue[pb.ClientFrame | None] = asyncio.Queue()
        self._closed = False
        self._broken: BaseException | None = None
        loop = asyncio.get_running_loop()
        self._reader: asyncio.Task[None] | None = None
        push_to = getattr(link, "push_to", None)
        if callable(push_to):
            # The link hands frames over as they are read: no reader task.
            push_to(self._arrived)
        else:
            self._reader = loop.create_task(self._read(), name="ensync-session-reader")
        self._writer = loop.create_task(self._write(), name="ensync-session-writer")

    @classmethod
    async def start(
        cls,
        link: FrameLink,
        client_id: str,
        *,
        timeout_s: float,
        route: Callable[[str], Callable[[Delivery], None] | None],
        lost: Callable[[BaseException], None],
    ) -> SessionStream:
        """Say hello on ``link`` for ``client_id`` and wait for the welcome.

        Raises:
            EnSyncConnectionError: the engine refused the session.
            EnSyncTimeoutError: the engine did not answer in ``timeout_s``.
        """
        hello = pb.SessionHello(client_id=client_id, version=VERSION, capabilities=[DELIVERIES])
        try:
            await asyncio.wait_for(link.write(pb.ClientFrame(hello=hello)), timeout_s)
            first = await asyncio.wait_for(link.read(), timeout_s)
        except TimeoutError:
            link.cancel()
            raise errors.EnSyncTimeoutError("the engine did not answer the session hello") from None
        if first is None or not first.HasField("welcome"):
            link.cancel()
            raise errors.EnSyncConnectionError("the engine ended the session before its welcome")
        return cls(link, first.welcome, timeout_s=timeout_s, route=route, lost=lost)

    # ------------------------------------------------------------------ calls

    async def publish(
        self, name: str, recipient: str, payload: str, metadata: str, payload_metadata: str | None
    ) -> pb.SessionPublished:
        """Send one publish in the next frame; its result."""
        limiter = self._limiter
        if not limiter.try_acquire():
            await limiter.acquire()
        try:
            seq = next(self._seqs)
            item = pb.SessionPublish(
                seq=seq,
                message_name=name,
                payload=payload,
                delivery_to=recipient,
                metadata=metadata,
            )
            if payload_metadata is not None:
                item.payload_metadata = payload_metadata
            self._publishes.append(item)
            if len(self._publishes) >= _EAGER_FLUSH:
                # Send a full frame now rather than at the end of the loop turn:
                # the engine works on it while the rest are still being sealed.
                self._flush()
            result: pb.SessionPublished = await self._answer(seq)
            return result
        finally:
            limiter.release()

    async def settle(
        self, kind: int, idem: str, name: str, *, delay_ms: int = 0, reason: str = ""
    ) -> pb.SessionSettled:
        """Send one settlement (ack, defer, discard, extend, release); its result."""
        limiter = self._limiter
        if not limiter.try_acquire():
            await limiter.acquire()
        try:
            seq = next(self._seqs)
            self._settles.append(
                pb.SessionSettle(
                    seq=seq,
                    kind=kind,  # type: ignore[arg-type]
                    message_idem=idem,
                    message_name=name,
                    delay_ms=delay_ms,
                    reason=reason,
                )
            )
            result: pb.SessionSettled = await self._answer(seq)
            return result
        finally:
            limiter.release()

    async def publish_checked(
        self, name: str, recipient: str, payload: str, metadata: str, payload_metadata: str | None
    ) -> str:
        """`publish`, raising `EnSyncPublishError` for a refusal; the idem."""
        result = await self.publish(name, recipient, payload, metadata, payload_metadata)
        if not result.success:
            self._refused(result.error_message, errors.EnSyncPublishError)
        return str(result.message_idem)

    async def ack(self, name: str, idem: str) -> None:
        await self._settle_checked(pb.SETTLE_ACK, name, idem, errors.EnSyncAckError)

    def ack_soon(
        self, name: str, idem: str, failed: Callable[[errors.EnSyncError], None]
    ) -> asyncio.Future[Any] | None:
        """Send an ack without a coroutine of its own (auto-ack's way, one per
        message); ``failed(error)`` hears of a refusal or a broken link. The
        future is done once the engine answered; ``None`` when the session has
        no room for another call now (then `ack` waits for room)."""
        if self._closed or self._broken is not None or not self._limiter.try_acquire():
            return None
        seq = next(self._seqs)
        self._settles.append(
            pb.SessionSettle(seq=seq, kind=pb.SETTLE_ACK, message_idem=idem, message_name=name)
        )
        answer = self._expect(seq)

        def answered(done: asyncio.Future[Any]) -> None:
            self._waiting.pop(seq, None)
            self._limiter.release()
            if done.cancelled():
                return
            error = done.exception()
            if isinstance(error, errors.EnSyncError):
                failed(error)
            elif error is None and not done.result().success:
                try:
                    self._refused(done.result().message, errors.EnSyncAckError)
                except errors.EnSyncError as refused:
                    failed(refused)

        answer.add_done_callback(answered)
        return answer

    async def defer(self, name: str, idem: str, delay_ms: int, reason: str) -> int:
        """The time the message comes back (epoch ms)."""
        result = await self._settle_checked(
            pb.SETTLE_DEFER, name, idem, errors.EnSyncDeferError, delay_ms=delay_ms, reason=reason
        )
        return int(result.time_ms)

    async def discard(self, name: str, idem: str, reason: str) -> None:
        await self._settle_checked(
            pb.SETTLE_DISCARD, name, idem, errors.EnSyncDiscardError, reason=reason
        )

    async def extend(self, name: str, idem: str) -> int:
        """The new ack deadline (epoch ms)."""
        result = await self._settle_checked(pb.SETTLE_EXTEND, name, idem, errors.EnSyncAckError)
        return int(result.time_ms)

    async def release(self, name: str, idem: str, reason: str) -> int | None:
        """When the message is visible again (epoch ms); ``None``: dead-lettered."""
        result = await self._settle_checked(
            pb.SETTLE_RELEASE, name, idem, errors.EnSyncAckError, reason=reason
        )
        return int(result.time_ms) or None

    async def _settle_checked(
        self,
        kind: int,
        name: str,
        idem: str,
        error: type[errors.EnSyncError],
        *,
        delay_ms: int = 0,
        reason: str = "",
    ) -> pb.SessionSettled:
        result = await self.settle(kind, idem, name, delay_ms=delay_ms, reason=reason)
        if not result.success:
            self._refused(result.message, error)
        return result

    def _refused(self, text: str, error: type[errors.EnSyncError]) -> NoReturn:
        if text.startswith(UNKNOWN_SESSION):
            # The engine no longer knows this client (it restarted, or the
            # session expired): the link is rebuilt.
            lost = errors.EnSyncConnectionError(f"the engine dropped this session: {text}")
            self._lost(lost)
            raise lost
        raise error(text)

    async def observe(self, pattern: str, observer: Observer) -> None:
        """Receive copies of the app's new messages matching ``pattern``
        without taking them (replaces an observer of the same pattern).

        Raises:
            EnSyncSubscriptionError: the engine refused (bad pattern, limit)
                or does not offer observing.
        """
        if not self.observing:
            raise errors.EnSyncSubscriptionError(
                "this engine does not offer observing (it needs an ensync engine "
                "with the batched session)"
            )
        self._observers[pattern] = observer
        try:
            await self._observe_call(pattern, stop=False)
        except BaseException:
            if self._observers.get(pattern) is observer:
                del self._observers[pattern]
            raise

    async def unobserve(self, pattern: str) -> None:
        """Stop the copies for ``pattern``."""
        if self._observers.pop(pattern, None) is not None:
            await self._observe_call(pattern, stop=True)

    async def _observe_call(self, pattern: str, *, stop: bool) -> None:
        seq = next(self._seqs)
        self._observes.append(pb.SessionObserve(seq=seq, pattern=pattern, stop=stop))
        result: pb.SessionSettled = await self._answer(seq)
        if not result.success:
            self._refused(result.message, errors.EnSyncSubscriptionError)

    def credit(self, name: str, count: int) -> None:
        """Let the engine send ``count`` more deliveries of ``name``."""
        if self._closed or count <= 0:
            return
        self._credits[name] = self._credits.get(name, 0) + count
        self._flush_soon()

    async def close(self) -> None:
        """End the session (idempotent); calls still waiting fail.

        An engine that offers it hears a goodbye first, after what is pending
        went out: it answers that, then ends the client's session at once
        (its unsettled deliveries go to other clients now, and the client no
        longer counts against its app's client limit).
        """
        if self._closed:
            return
        if self._says_goodbye and self._broken is None and self._leaving is None:
            await self._goodbye()
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._fail_all(errors.EnSyncConnectionError("the connection was closed"))
        self._limiter.close(errors.EnSyncConnectionError("the connection was closed"))
        self._outbox.put_nowait(None)
        self._link.cancel()
        tasks = [task for task in (self._reader, self._writer) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _goodbye(self) -> None:
        leaving = self._leaving = asyncio.get_running_loop().create_future()
        self._flush()
        self._outbox.put_nowait(pb.ClientFrame(goodbye=True))
        try:
            await asyncio.wait_for(asyncio.shield(leaving), _GOODBYE_WAIT_S)
        except TimeoutError:
            log.debug("the engine did not answer the goodbye in %g s", _GOODBYE_WAIT_S)

    def _left(self) -> None:
        if self._leaving is not None and not self._leaving.done():
            self._leaving.set_result(None)

    # ------------------------------------------------------------------ plumbing

    async def _answer(self, seq: int) -> Any:
        future = self._expect(seq)
        try:
            return await future
        finally:
            self._waiting.pop(seq, None)

    def _expect(self, seq: int) -> asyncio.Future[Any]:
        """The future of the answer to item ``seq`` (sent in the next frame)."""
        if self._broken is not None:
            raise errors.EnSyncConnectionError(f"the session is broken: {self._broken}")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._waiting[seq] = future
        # One timer for all calls: deadlines come in the order calls were made.
        self._deadlines.append((loop.time() + self._timeout, seq))
        if self._timer is None:
            self._timer = loop.call_at(self._deadlines[0][0], self._expire)
        self._flush_soon()
        return future

    def _expire(self) -> None:
        """Calls past their deadline fail; one of them means a stalled link,
        which is rebuilt."""
        self._timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        late: BaseException | None = None
        while self._deadlines and self._deadlines[0][0] <= now:
            _, seq = self._deadlines.popleft()
            future = self._waiting.get(seq)
            if future is not None and not future.done():
                late = errors.EnSyncTimeoutError(
                    f"the engine did not answer in {self._timeout:g} s"
                )
                future.set_exception(late)
        # Answered calls leave their deadline behind: skip them.
        while self._deadlines and self._deadlines[0][1] not in self._waiting:
            self._deadlines.popleft()
        if self._deadlines and not self._closed:
            self._timer = loop.call_at(self._deadlines[0][0], self._expire)
        if late is not None:
            self._break(late)

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        if not (self._publishes or self._settles or self._credits or self._observes):
            return
        frame = pb.ClientFrame(
            settles=self._settles,
            credits=[pb.SessionCredit(message_name=n, credit=c) for n, c in self._credits.items()],
            observes=self._observes,
        )
        self._settles, self._credits, self._observes = [], {}, []
        budget = self._max_frame_bytes - frame.ByteSize()
        for item in self._publishes:
            size = item.ByteSize() + 8
            if size > budget and (frame.publishes or frame.settles or frame.credits):
                self._outbox.put_nowait(frame)
                frame = pb.ClientFrame()
                budget = self._max_frame_bytes
            frame.publishes.append(item)
            budget -= size
        self._publishes = []
        self._outbox.put_nowait(frame)

    async def _write(self) -> None:
        try:
            while (frame := await self._outbox.get()) is not None:
                await self._link.write(frame)
        except errors.EnSyncConnectionError as exc:
            self._ended(exc)

    async def _read(self) -> None:
        cause: BaseException = errors.EnSyncConnectionError("the engine ended the session")
        try:
            while (frame := await self._link.read()) is not None:
                self._take(frame)
        except errors.EnSyncConnectionError as exc:
            cause = exc
        self._ended(cause)

    def _arrived(self, item: pb.ServerFrame | BaseException | None) -> None:
        """What a pushing link read: a frame, the end (None), or why it broke."""
        if isinstance(item, pb.ServerFrame):
            try:
                self._take(item)
            except Exception as exc:  # isolation boundary: the link's reader is not ours
                log.exception("a session frame could not be handled")
                self._break(errors.EnSyncConnectionError(f"a session frame failed: {exc!r}"))
        elif item is None:
            self._ended(errors.EnSyncConnectionError("the engine ended the session"))
        else:
            self._ended(item)

    def _ended(self, cause: BaseException) -> None:
        """The link ended or broke: expected after a goodbye, a loss otherwise."""
        if self._leaving is not None:
            self._left()
        else:
            self._break(cause)

    def _take(self, frame: pb.ServerFrame) -> None:
        for published in frame.published:
            self._resolve(published.seq, published)
        for settled in frame.settled:
            self._resolve(settled.seq, settled)
        for answer in frame.observing:
            self._resolve(answer.seq, answer)
        if frame.observed or frame.observed_missed:
            self._take_observed(frame)
        if frame.goodbye:
            self._left()
        if not frame.deliveries:
            return
        now_ms = time.time_ns() // 1_000_000  # once per frame
        for item in frame.deliveries:
            deliver = self._route(item.message_name)
            if deliver is None:
                continue
            try:
                deliver(from_stream_response(item, name=item.message_name, received_at_ms=now_ms))
            except Exception:  # isolation boundary: one bad delivery must not end the session
                log.exception("a session delivery could not be handed over")

    def _take_observed(self, frame: pb.ServerFrame) -> None:
        now_ms = time.time_ns() // 1_000_000
        observers = list(self._observers.items())
        missed = frame.observed_missed
        for pattern, observer in observers:
            try:
                for item in frame.observed:
                    if matches(pattern, item.message_name):
                        observer.copied(
                            from_stream_response(
                                item, name=item.message_name, received_at_ms=now_ms, attempt=0
                            )
                        )
                if missed:
                    observer.dropped(missed)
            except Exception:  # isolation boundary: one observer must not end the session
                log.exception("an observed copy could not be handed over")

    def _resolve(self, seq: int, result: Any) -> None:
        future = self._waiting.get(seq)
        if future is not None and not future.done():
            future.set_result(result)

    def _break(self, cause: BaseException) -> None:
        if self._closed or self._broken is not None:
            return
        self._broken = cause
        self._fail_all(cause)
        self._lost(cause)

    def _fail_all(self, cause: BaseException) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(cause)
                future.exception()  # retrieved: its caller may be gone


class SessionObserving:
    """``observe`` / ``unobserve`` for a transport that may run a batched
    session (``_batched``): observing needs one."""

    _batched: SessionStream | None

    async def observe(self, pattern: str, observer: Observer) -> None:
        await self._observing().observe(pattern, observer)

    async def unobserve(self, pattern: str) -> None:
        await self._observing().unobserve(pattern)

    def _observing(self) -> SessionStream:
        if self._batched is None:
            raise errors.EnSyncSubscriptionError(
                "observing needs the batched session, which this connection does not use"
            )
        return self._batched
