"""The SDK's side of ensync's batched session (``EnSyncSession/Session``).

Concurrent calls are coalesced: every publish and settlement started in one
turn of the event loop goes out in one frame, and the engine answers in
frames too, carrying deliveries as well when it agreed to. Callers see one
awaitable per call, exactly as with the official calls; only an engine
without the session makes the transport fall back to those.

The frames travel over a `FrameLink`, which each network transport provides
(the ``Session`` method on gRPC, binary messages on WebSocket); the session
knows nothing else of the wire. What it keeps between frames is in
`ensync.client.frames`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

from ensync import errors
from ensync._proto import ensync_pb2 as pb
from ensync.client.frames import FrameBuilder, PendingCalls
from ensync.client.limiter import CallLimiter
from ensync.client.tasks import TaskOwner
from ensync.client.transport import Deliver, LostCallback, Observer, SettleKind, Settlement
from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.names import matches
from ensync.protocol.records import from_stream_response

__all__ = ["SUBSCRIPTION_CREDIT", "FrameLink", "SessionStream"]

log = logging.getLogger(__name__)

VERSION = 1
DELIVERIES = "deliveries"
OBSERVE = "observe"
GOODBYE = "goodbye"
# How long `close` waits for the engine's answer to a goodbye. Past it the
# client closes anyway; the engine ends the session when heartbeats stop.
_GOODBYE_WAIT_S = 2.0
# Items the SDK keeps outstanding on one session when the engine does not say.
_DEFAULT_OUTSTANDING = 4096
# Deliveries a subscription lets the engine send ahead on the session; each
# one handed to the subscription's handlers gives one credit back.
SUBSCRIPTION_CREDIT = 512

_KINDS = {
    SettleKind.ACK: pb.SETTLE_ACK,
    SettleKind.DEFER: pb.SETTLE_DEFER,
    SettleKind.DISCARD: pb.SETTLE_DISCARD,
    SettleKind.EXTEND: pb.SETTLE_EXTEND,
    SettleKind.RELEASE: pb.SETTLE_RELEASE,
}


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
        """The next frame; ``None`` once the engine ended the session.

        Raises `EnSyncConnectionError` if the link broke.
        """
        ...

    def cancel(self) -> None:
        """Stop the link (the session is over)."""
        ...


def _answer_of(kind: SettleKind, result: pb.SessionSettled) -> int | None:
    """What a settlement of ``kind`` answers (see `Settlement`)."""
    if kind is SettleKind.ACK or kind is SettleKind.DISCARD:
        return None
    if kind is SettleKind.RELEASE:
        return int(result.time_ms) or None  # 0: dead-lettered
    return int(result.time_ms)


class SessionStream:
    """One open session; create it with `start`.

    Args:
        link: what carries the frames.
        welcome: the engine's answer to the hello.
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
        route: Callable[[str], Deliver | None],
        lost: LostCallback,
    ) -> None:
        self._link = link
        self.deliveries = DELIVERIES in welcome.capabilities
        self.observing = OBSERVE in welcome.capabilities
        self._says_goodbye = GOODBYE in welcome.capabilities
        # Set while a goodbye waits for its answer: the end is then expected.
        self._leaving: asyncio.Future[None] | None = None
        self._observers: dict[str, Observer] = {}
        frame_bytes = welcome.limits.get("max_frame_bytes", "")
        # Frames go out below the engine's message size limit.
        self._outgoing = FrameBuilder(int(frame_bytes) if frame_bytes.isdigit() else 1024 * 1024)
        outstanding = welcome.limits.get("max_outstanding", "")
        limit = int(outstanding) // 2 if outstanding.isdigit() else _DEFAULT_OUTSTANDING
        self._limiter = CallLimiter(max(1, limit))
        self._calls = PendingCalls(timeout_s, self._break)
        self._route = route
        self._lost = lost
        self._flush_scheduled = False
        self._outbox: asyncio.Queue[pb.ClientFrame | None] = asyncio.Queue()
        self._closed = False
        self._tasks = TaskOwner()
        push_to = getattr(link, "push_to", None)
        if callable(push_to):
            # The link hands frames over as they are read: no reader task.
            push_to(self._arrived)
        else:
            self._tasks.start(self._read(), name="ensync-session-reader")
        self._tasks.start(self._write(), name="ensync-session-writer")

    @classmethod
    async def start(
        cls,
        link: FrameLink,
        client_id: str,
        *,
        timeout_s: float,
        route: Callable[[str], Deliver | None],
        lost: LostCallback,
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
    ) -> str:
        """Send one publish in the next frame; its idem.

        Raises:
            EnSyncPublishError: the engine refused.
        """
        limiter = self._limiter
        if not limiter.try_acquire():
            await limiter.acquire()
        try:
            seq = self._calls.next_seq()
            item = pb.SessionPublish(
                seq=seq,
                message_name=name,
                payload=payload,
                delivery_to=recipient,
                metadata=metadata,
            )
            if payload_metadata is not None:
                item.payload_metadata = payload_metadata
            if self._outgoing.publish(item):
                # Send a full frame now rather than at the end of the loop turn:
                # the engine works on it while the rest are still being sealed.
                self._flush()
            result: pb.SessionPublished = await self._answer(seq)
        finally:
            limiter.release()
        if not result.success:
            self._refused(result.error_message, errors.EnSyncPublishError)
        return str(result.message_idem)

    async def settle(self, settlement: Settlement) -> int | None:
        """Send one settlement in the next frame; its answer (see `Settlement`).

        Raises:
            EnSyncError: ``settlement.error`` if the engine refused.
        """
        limiter = self._limiter
        if not limiter.try_acquire():
            await limiter.acquire()
        try:
            seq = self._queue_settle(settlement)
            result: pb.SessionSettled = await self._answer(seq)
        finally:
            limiter.release()
        if not result.success:
            self._refused(result.message, settlement.error)
        return _answer_of(settlement.kind, result)

    def settle_soon(
        self, settlement: Settlement, failed: Callable[[errors.EnSyncError], None]
    ) -> asyncio.Future[Any] | None:
        """Send a settlement without a coroutine of its own (auto-ack's way).

        ``failed(error)`` hears of a refusal or a broken link. The future is
        done once the engine answered; ``None`` when the session has no room
        for another call now (then `settle` waits).
        """
        if self._closed or self._calls.broken is not None or not self._limiter.try_acquire():
            return None
        seq = self._queue_settle(settlement)
        answer = self._calls.expect(seq)
        self._flush_soon()

        def answered(done: asyncio.Future[Any]) -> None:
            self._calls.forget(seq)
            self._limiter.release()
            if done.cancelled():
                return
            error = done.exception()
            if isinstance(error, errors.EnSyncError):
                failed(error)
            elif error is None and not done.result().success:
                try:
                    self._refused(done.result().message, settlement.error)
                except errors.EnSyncError as refused:
                    failed(refused)

        answer.add_done_callback(answered)
        return answer

    def _queue_settle(self, settlement: Settlement) -> int:
        seq = self._calls.next_seq()
        self._outgoing.settle(
            pb.SessionSettle(
                seq=seq,
                kind=_KINDS[settlement.kind],
                message_idem=settlement.idem,
                message_name=settlement.name,
                delay_ms=settlement.delay_ms,
                reason=settlement.reason,
            )
        )
        return seq

    def _refused(self, text: str, error: type[errors.EnSyncError]) -> NoReturn:
        if text.startswith(UNKNOWN_SESSION):
            # The engine no longer knows this client (it restarted, or the
            # session expired): the link is rebuilt.
            lost = errors.EnSyncConnectionError(f"the engine dropped this session: {text}")
            self._lost(lost)
            raise lost
        raise error(text)

    async def observe(self, pattern: str, observer: Observer) -> None:
        """Receive copies of the app's new messages matching ``pattern``, without taking them.

        Replaces an observer of the same pattern.

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
        seq = self._calls.next_seq()
        self._outgoing.observe(pb.SessionObserve(seq=seq, pattern=pattern, stop=stop))
        result: pb.SessionSettled = await self._answer(seq)
        if not result.success:
            self._refused(result.message, errors.EnSyncSubscriptionError)

    def credit(self, name: str, count: int) -> None:
        """Let the engine send ``count`` more deliveries of ``name``."""
        if self._closed or count <= 0:
            return
        self._outgoing.credit(name, count)
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
        if self._says_goodbye and self._calls.broken is None and self._leaving is None:
            await self._goodbye()
        self._closed = True
        closed = errors.EnSyncConnectionError("the connection was closed")
        self._calls.close(closed)
        self._limiter.close(closed)
        self._outbox.put_nowait(None)
        self._link.cancel()
        await self._tasks.close()

    async def _goodbye(self) -> None:
        leaving = self._leaving = asyncio.get_running_loop().create_future()
        self._flush()
        self._outbox.put_nowait(pb.ClientFrame(goodbye=True))
        try:
            await asyncio.wait_for(asyncio.shield(leaving), _GOODBYE_WAIT_S)
        except TimeoutError:
            log.debug("the engine did not answer the goodbye in %g s", _GOODBYE_WAIT_S)

    # ------------------------------------------------------------------ frames out

    async def _answer(self, seq: int) -> Any:
        future = self._calls.expect(seq)
        self._flush_soon()
        try:
            return await future
        finally:
            self._calls.forget(seq)

    def _flush_soon(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._closed:
            return
        for frame in self._outgoing.frames():
            self._outbox.put_nowait(frame)

    async def _write(self) -> None:
        try:
            while (frame := await self._outbox.get()) is not None:
                await self._link.write(frame)
        except errors.EnSyncConnectionError as exc:
            self._ended(exc)

    # ------------------------------------------------------------------ frames in

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
        if self._leaving is None:
            self._break(cause)
        elif not self._leaving.done():
            self._leaving.set_result(None)

    def _take(self, frame: pb.ServerFrame) -> None:
        calls = self._calls
        for published in frame.published:
            calls.resolve(published.seq, published)
        for settled in frame.settled:
            calls.resolve(settled.seq, settled)
        for answer in frame.observing:
            calls.resolve(answer.seq, answer)
        if frame.observed or frame.observed_missed:
            self._take_observed(frame)
        if frame.goodbye and self._leaving is not None and not self._leaving.done():
            self._leaving.set_result(None)
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
        missed = frame.observed_missed
        for pattern, observer in list(self._observers.items()):
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

    def _break(self, cause: BaseException) -> None:
        if self._closed or self._calls.broken is not None:
            return
        self._calls.broken = cause
        self._calls.fail_all(cause)
        self._lost(cause)
