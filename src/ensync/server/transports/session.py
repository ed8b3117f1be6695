"""The engine's side of ensync's batched session (``EnSyncSession/Session``).

One bidirectional stream per client, opened after Connect, carries frames
each way (proto/ensync.proto, docs/protocol.md). Over gRPC it is its own
method; over WebSocket the same frames travel as binary messages on the
connection that sent ``CONN`` (a :class:`SessionPeer` hides the difference):

* client → engine: the hello (first frame), publishes, settlements (ack,
  defer, discard, extend, release) and delivery credits;
* engine → client: the welcome, publish and settlement results, and — when
  the client asked for the ``deliveries`` capability — its deliveries;
* observations (``observe`` capability): copies of the app's new messages
  for a client that watches without taking (core/observers.py);
* a goodbye (``goodbye`` capability): the client is closing for good, so its
  session ends as soon as what it started is answered. A stream that just
  ends only detaches: the client may resume on another stream or node.

A reader takes frames as they come and starts each item; a writer sends
whatever results and deliveries are ready in one frame, so a busy client
costs the engine per frame, not per message. Publishes of one session are
accepted in the order they arrive, so they are numbered in that order.
Official clients never open this stream.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from ensync._proto import ensync_pb2 as pb
from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.records import to_stream_response
from ensync.server.core.calls import Observe, Publish, Settle, SettleKind
from ensync.server.core.errors import ServiceError
from ensync.server.core.model import Delivery
from ensync.server.runtime.engine import Engine

__all__ = [
    "DELIVERIES",
    "GOODBYE",
    "OBSERVE",
    "SESSION_SERVICE",
    "SESSION_VERSION",
    "Refusal",
    "SessionOutbox",
    "SessionPeer",
    "serve_session",
]

log = logging.getLogger(__name__)

SESSION_SERVICE = "ensync.EnSyncSession"
SESSION_VERSION = 1
DELIVERIES = "deliveries"
OBSERVE = "observe"
GOODBYE = "goodbye"
# Most items the engine puts in one frame (the rest go in the next).
MAX_ITEMS_PER_FRAME = 1024
# Most items a client may have started and not yet answered on one session;
# past that the engine stops reading the stream until answers went out.
MAX_OUTSTANDING = 8192
# Most observed copies waiting for one session; past that they are dropped
# and counted (an observer never slows the engine or the app's consumers).
MAX_OBSERVED_WAITING = 4096


class Refusal(enum.Enum):
    """Why a session was refused before it began."""

    NO_HELLO = "no hello"
    UNKNOWN_CLIENT = "unknown client"


class SessionPeer(Protocol):
    """How a session reaches its client: the transport's half of it."""

    async def send(self, frame: pb.ServerFrame) -> None:
        """Send one frame (raises if the link is gone)."""
        ...

    async def refuse(self, why: Refusal, text: str) -> NoReturn:
        """End the session before its welcome, telling the client why."""
        ...


@dataclass(eq=False, slots=True)
class SessionOutbox:
    """What the engine owes one session: results and deliveries, by kind.

    It is also the client's delivery sink when the session carries
    deliveries: ``push`` spends a credit of the message's name.
    """

    deliveries_on: bool = False
    # Bytes one frame may hold (the peers' message size limit, less room).
    max_frame_bytes: int = 1024 * 1024
    # Unsettled deliveries per subscription: our SDK keeps buffered
    # messages leased, so it can hold more than an official client.
    session_window: int = 1024
    published: deque[pb.SessionPublished] = field(default_factory=deque)
    settled: deque[pb.SessionSettled] = field(default_factory=deque)
    deliveries: deque[Delivery] = field(default_factory=deque)
    observing: deque[pb.SessionSettled] = field(default_factory=deque)
    observed_copies: deque[Delivery] = field(default_factory=deque)
    observed_missed: int = 0
    credits: dict[str, int] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    outstanding: int = 0
    closed: bool = False

    def close(self) -> None:
        """The engine ends the session (the client was dropped or replaced)."""
        self.closed = True
        self.ready.set()
        self.ended.set()

    def room(self, name: str, held: int, window: int) -> int:
        return min(self.credits.get(name, 0), max(window, self.session_window) - held)

    def push(self, delivery: Delivery) -> None:
        self.credits[delivery.name] = self.credits.get(delivery.name, 0) - 1
        self.deliveries.append(delivery)
        self.ready.set()

    def observed(self, delivery: Delivery) -> bool:
        self.ready.set()
        if len(self.observed_copies) >= MAX_OBSERVED_WAITING:
            self.observed_missed += 1
            return False
        self.observed_copies.append(delivery)
        return True

    def answer_observe(self, result: pb.SessionSettled) -> None:
        self.observing.append(result)
        self.outstanding -= 1
        self.ready.set()

    def answer_publish(self, result: pb.SessionPublished) -> None:
        self.published.append(result)
        self.outstanding -= 1
        self.ready.set()

    def answer_settle(self, result: pb.SessionSettled) -> None:
        self.settled.append(result)
        self.outstanding -= 1
        self.ready.set()

    def frame(self) -> pb.ServerFrame | None:
        """The next frame to send, at most MAX_ITEMS_PER_FRAME items; None if nothing."""
        if not (
            self.published
            or self.settled
            or self.deliveries
            or self.observing
            or self.observed_copies
            or self.observed_missed
        ):
            self.ready.clear()
            return None
        frame = pb.ServerFrame()
        room = MAX_ITEMS_PER_FRAME
        while self.published and room:
            frame.published.append(self.published.popleft())
            room -= 1
        while self.settled and room:
            frame.settled.append(self.settled.popleft())
            room -= 1
        while self.observing and room:
            frame.observing.append(self.observing.popleft())
            room -= 1
        budget = self.max_frame_bytes
        room, budget = _fill(self.deliveries, frame.deliveries, room, budget, oversize=True)
        # An oversized copy may only travel alone: never past the frame limit.
        _fill(self.observed_copies, frame.observed, room, budget, oversize=not frame.deliveries)
        if self.observed_missed:
            frame.observed_missed, self.observed_missed = self.observed_missed, 0
        return frame


def _fill(
    waiting: deque[Delivery], into: Any, room: int, budget: int, *, oversize: bool
) -> tuple[int, int]:
    """Move deliveries into a frame while it has room (items and bytes; with
    ``oversize``, the first goes in even if larger than the budget, alone);
    what room and budget are left."""
    while waiting and room:
        delivery = waiting[0]
        size = len(delivery.payload) + len(delivery.metadata) + len(delivery.name) + 128
        if size > budget and (len(into) or not oversize):
            return 0, budget  # the next frame takes it
        into.append(to_stream_response(waiting.popleft()))
        budget -= size
        room -= 1
    return room, budget


async def serve_session(
    engine: Engine,
    frames: AsyncIterator[pb.ClientFrame],
    peer: SessionPeer,
    attach: Callable[[str, SessionOutbox], bool],
    detach: Callable[[str, SessionOutbox], None],
    *,
    max_frame_bytes: int,
    leave: Callable[[str], None],
) -> None:
    """Run one session stream until either side ends it.

    ``attach(client_id, outbox)`` binds the session to a connected client
    (``False``: no such client); ``detach`` undoes it when the stream ends;
    ``leave(client_id)`` ends the client's session after a goodbye.
    """
    try:
        first = await anext(frames)
    except StopAsyncIteration:
        return
    hello = first.hello
    if not first.HasField("hello") or not hello.client_id:
        await peer.refuse(Refusal.NO_HELLO, "the first frame must be a hello")
    outbox = SessionOutbox(
        deliveries_on=DELIVERIES in hello.capabilities,
        max_frame_bytes=max_frame_bytes,
        session_window=engine.config.session_window,
    )
    if not attach(hello.client_id, outbox):
        await peer.refuse(Refusal.UNKNOWN_CLIENT, f"{UNKNOWN_SESSION}: connect first")
    client_id = hello.client_id
    welcome = pb.SessionWelcome(
        version=min(SESSION_VERSION, hello.version or SESSION_VERSION),
        capabilities=[DELIVERIES, OBSERVE, GOODBYE] if outbox.deliveries_on else [OBSERVE, GOODBYE],
        limits={
            "max_items_per_frame": str(MAX_ITEMS_PER_FRAME),
            "max_outstanding": str(MAX_OUTSTANDING),
            "max_frame_bytes": str(max_frame_bytes),
        },
    )
    await peer.send(pb.ServerFrame(welcome=welcome))
    session = _Session(engine, client_id, outbox)
    loop = asyncio.get_running_loop()
    writer = loop.create_task(session.write_loop(peer))
    reader = loop.create_task(session.read_loop(frames))
    ended = loop.create_task(outbox.ended.wait())
    try:
        await asyncio.wait({reader, ended}, return_when=asyncio.FIRST_COMPLETED)
        if reader.done():
            reader.result()  # a client that half-closed: answer what it started
            await session.drain()
            # The writer sends what is left, then ends: a stream takes one
            # write at a time (grpcio fails a second with TOO_MANY_OPERATIONS).
            outbox.closed = True
            outbox.ready.set()
            await writer
            if session.goodbye:
                # Over before the client hears it: a client that reads the
                # answer may count on its session being gone.
                leave(client_id)
                await peer.send(pb.ServerFrame(goodbye=True))
    finally:
        for task in (reader, ended):
            task.cancel()
        await asyncio.gather(reader, ended, return_exceptions=True)
        outbox.closed = True
        outbox.ready.set()
        engine.observers.drop_sink(outbox)
        detach(client_id, outbox)
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)


class _Session:
    def __init__(self, engine: Engine, client_id: str, outbox: SessionOutbox) -> None:
        self._ops = engine.operations
        self._client_id = client_id
        self._outbox = outbox
        # Publishes and settlements answered from callbacks: a half-close
        # waits for them.
        self._pending: set[asyncio.Future[Any]] = set()
        self._room = asyncio.Event()
        self._room.set()
        self.goodbye = False

    async def read_loop(self, frames: AsyncIterator[pb.ClientFrame]) -> None:
        async for frame in frames:
            if frame.publishes:
                self._outbox.outstanding += len(frame.publishes)
                await self._publish(frame.publishes)
            if frame.settles:
                self._outbox.outstanding += len(frame.settles)
                self._settle(frame.settles)
            for observe in frame.observes:
                self._outbox.outstanding += 1
                self._observe(observe)
            if frame.credits:
                credits = self._outbox.credits
                unblocked = False
                for credit in frame.credits:
                    name = credit.message_name
                    before = credits.get(name, 0)
                    credits[name] = before + credit.credit
                    unblocked = unblocked or (before <= 0 < credits[name])
                # Credits topping up a name that still had some change
                # nothing the engine waits for: no claim for them.
                if unblocked:
                    self._ops.routes_changed(self._client_id)
            if frame.goodbye:
                self.goodbye = True
                return  # answered like a half-close, then the session ends
            while self._outbox.outstanding >= MAX_OUTSTANDING:
                self._room.clear()
                await self._room.wait()

    async def drain(self) -> None:
        """The client half-closed: let what it started finish and be answered."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def write_loop(self, peer: SessionPeer) -> None:
        outbox = self._outbox
        while not outbox.closed:
            await outbox.ready.wait()
            while (frame := outbox.frame()) is not None:
                await peer.send(frame)
            if outbox.outstanding < MAX_OUTSTANDING:
                self._room.set()

    async def _publish(self, items: Sequence[pb.SessionPublish]) -> None:
        client = self._client_id
        answers = await self._ops.publish(
            [
                Publish(
                    client,
                    item.message_name,
                    item.payload,
                    item.delivery_to,
                    item.metadata,
                    item.payload_metadata if item.HasField("payload_metadata") else None,
                )
                for item in items
            ]
        )
        for item, answer in zip(items, answers, strict=True):
            if answer.done():
                self._published(item.seq, answer)
            else:
                self._pending.add(answer)
                answer.add_done_callback(functools.partial(self._published, item.seq))

    def _published(self, seq: int, answer: asyncio.Future[str]) -> None:
        self._pending.discard(answer)
        refusal = _refusal(answer, "a publish")
        if refusal is not None:
            result = pb.SessionPublished(seq=seq, success=False, error_message=refusal)
        else:
            result = pb.SessionPublished(seq=seq, success=True, message_idem=answer.result())
        self._outbox.answer_publish(result)

    def _settle(self, items: Sequence[pb.SessionSettle]) -> None:
        calls: list[Settle] = []
        seqs: list[int] = []
        for item in items:
            kind = _KINDS.get(item.kind)
            if kind is None:
                self._outbox.answer_settle(
                    pb.SessionSettled(
                        seq=item.seq, success=False, message=f"unknown settle kind {item.kind}"
                    )
                )
                continue
            seqs.append(item.seq)
            calls.append(
                Settle(
                    self._client_id,
                    item.message_idem,
                    kind,
                    name=item.message_name or None,
                    delay_ms=item.delay_ms,
                    reason=item.reason,
                )
            )
        for seq, answer in zip(seqs, self._ops.settle(calls), strict=True):
            self._pending.add(answer)
            answer.add_done_callback(functools.partial(self._settled, seq))

    def _settled(self, seq: int, answer: asyncio.Future[int | None]) -> None:
        self._pending.discard(answer)
        refusal = _refusal(answer, "a settlement")
        if refusal is not None:
            result = pb.SessionSettled(seq=seq, success=False, message=refusal)
        else:
            result = pb.SessionSettled(seq=seq, success=True, time_ms=answer.result() or 0)
        self._outbox.answer_settle(result)

    def _observe(self, item: pb.SessionObserve) -> None:
        try:
            self._ops.observe(Observe(self._client_id, item.pattern, item.stop), self._outbox)
        except ServiceError as exc:
            result = pb.SessionSettled(seq=item.seq, success=False, message=exc.message)
        else:
            result = pb.SessionSettled(seq=item.seq, success=True)
        self._outbox.answer_observe(result)


_KINDS = {
    pb.SETTLE_ACK: SettleKind.ACK,
    pb.SETTLE_DEFER: SettleKind.DEFER,
    pb.SETTLE_DISCARD: SettleKind.DISCARD,
    pb.SETTLE_EXTEND: SettleKind.EXTEND,
    pb.SETTLE_RELEASE: SettleKind.RELEASE,
}


def _refusal(answer: asyncio.Future[Any], what: str) -> str | None:
    """Why a finished call failed, in the words its client gets; None if it did not."""
    if answer.cancelled():
        return "cancelled"
    error = answer.exception()
    if error is None:
        return None
    if isinstance(error, ServiceError):
        return error.message
    log.error("%s failed", what, exc_info=error)
    return "internal error"
