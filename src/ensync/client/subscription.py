"""A subscription: handlers or ``async for``, and the per-message verbs.

Messages of one subscription are handled one at a time, in arrival order,
by a task the subscription owns. With handlers registered, every handler
sees every message; when all of them succeed and ``auto_ack`` is on, the
message is acked once. A handler that raises leaves the message unacked: it
is given back to the engine, which delivers it again after its redelivery
backoff (and dead-letters it after ``max_deliveries``), and the error is
reported through the engine's ``error`` event and the log. Without
handlers, messages go to ``async for`` loops; with ``auto_ack`` a message is
acked when the loop body finishes for it without raising.

While a handler (or loop body) runs, the subscription extends the message's
lease before the engine's ack deadline passes, so a slow handler does not
cause a second delivery.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ensync import errors
from ensync.client.transport import Delivery
from ensync.crypto import OpeningKey, open_envelope, parse_envelope
from ensync.models import Message, ReplayInfo
from ensync.protocol.records import metadata_object, split_replay_info

if TYPE_CHECKING:
    from ensync.client.client import EnSyncClient

__all__ = ["Handler", "Subscription"]

log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[object] | object]

MAX_DEFER_MS = 86_400_000


class Subscription:
    """Messages of one name for one client. Get one from ``client.subscribe``.

    Example::

        sub = await client.subscribe("orders/created", auto_ack=False)
        remove = sub.on(handle)          # or: async for message in sub: ...
        await sub.ack(message.idem, message.block)
    """

    def __init__(self, client: EnSyncClient, name: str, auto_ack: bool, key: OpeningKey) -> None:
        self._client = client
        self.name = name
        self.auto_ack = auto_ack
        self._key = key
        self._handlers: list[Handler] = []
        self._inbox: deque[Delivery] = deque()
        # When each buffered message's lease was last taken or extended.
        self._leased_at: dict[str, float] = {}
        self._keeper: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()
        self._consumers = asyncio.Event()  # set while handlers or iterators exist
        self._iterators = 0
        self._for_iterators: asyncio.Queue[Message] = asyncio.Queue()
        self._closed = False
        # Set by close: no new message is taken up; the one in hand finishes.
        self._closing = False
        self._closed_event = asyncio.Event()
        self._acks: set[asyncio.Task[None]] = set()
        self._task = asyncio.get_running_loop().create_task(
            self._dispatch(), name=f"ensync-subscription-{name}"
        )

    # ------------------------------------------------------------------ consuming

    def on(self, handler: Handler) -> Callable[[], None]:
        """Call ``handler(message)`` for every message (sync or async).

        Returns a function that removes the handler again.
        """
        if not callable(handler):
            raise errors.EnSyncValidationError("handler must be callable")
        self._handlers.append(handler)
        self._consumers.set()

        def remove() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)
            self._update_consumers()

        return remove

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        self._iterators += 1
        self._consumers.set()
        try:
            while not self._closed:
                getter = asyncio.ensure_future(self._for_iterators.get())
                closed = asyncio.ensure_future(self._closed_event.wait())
                done, _ = await asyncio.wait({getter, closed}, return_when=asyncio.FIRST_COMPLETED)
                closed.cancel()
                if getter not in done:
                    getter.cancel()
                    return
                message = getter.result()
                extender = self._keep_leased(message)
                try:
                    yield message
                finally:
                    if extender is not None:
                        extender.cancel()
                # Resumed: the loop body finished for this message.
                if self.auto_ack:
                    await self._auto_ack(message)
        finally:
            self._iterators -= 1
            self._update_consumers()

    def _update_consumers(self) -> None:
        if self._handlers or self._iterators:
            self._consumers.set()
        else:
            self._consumers.clear()

    def _deliver(self, wire: Delivery) -> None:
        """Called by the transport's reader for every delivery, in order."""
        loop = asyncio.get_running_loop()
        self._inbox.append(wire)
        self._leased_at[wire.idem] = loop.time()
        self._arrived.set()
        if self._keeper is None and self._client._connection.ack_deadline_ms:
            self._keeper = loop.create_task(
                self._keep_buffer_leased(self._client._connection.ack_deadline_ms)
            )

    async def _keep_buffer_leased(self, deadline_ms: int) -> None:
        """Extend the leases of messages still waiting their turn, so that a slow
        handler ahead of them does not let the engine hand them to another client."""
        interval_s = max(deadline_ms / 3000, 0.05)
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(interval_s)
            now = loop.time()
            due = [w for w in self._inbox if now - self._leased_at.get(w.idem, now) >= interval_s]
            if not due:
                continue
            try:
                transport = self._client._transport()
            except errors.EnSyncError:
                continue  # the link is down: the engine requeues them anyway
            outcomes = await asyncio.gather(
                *(transport.extend(self.name, w.idem) for w in due), return_exceptions=True
            )
            for wire, outcome in zip(due, outcomes, strict=True):
                if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
                    raise outcome
                if not isinstance(outcome, Exception) and wire.idem in self._leased_at:
                    self._leased_at[wire.idem] = now

    async def _dispatch(self) -> None:
        while not self._closing:
            if not self._inbox:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            await self._consumers.wait()
            if self._closing:
                return
            wire = self._inbox.popleft()
            self._leased_at.pop(wire.idem, None)
            try:
                message = self._open(wire)
            except errors.EnSyncMessageError as exc:
                # Left unacked: the engine delivers it again and, if it never
                # becomes readable, dead-letters it after max_deliveries.
                self._client._report(exc)
                continue
            if self._handlers:
                await self._run_handlers(message)
            else:
                await self._for_iterators.put(message)

    async def _run_handlers(self, message: Message) -> None:
        failure: Exception | None = None
        extender = self._keep_leased(message)
        try:
            for handler in list(self._handlers):
                try:
                    result = handler(message)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # isolation boundary: user code
                    failure = exc
                    log.exception("handler for %s failed on %s", self.name, message.idem)
                    error = errors.EnSyncGenericError(
                        f"handler for {self.name!r} failed on message {message.idem}: {exc!r}"
                    )
                    error.__cause__ = exc
                    self._client._report(error)
        finally:
            if extender is not None:
                extender.cancel()
        if failure is not None:
            self._background(self._release(message, repr(failure)[:200]))
        elif self.auto_ack:
            await self._auto_ack(message)

    def _keep_leased(self, message: Message) -> asyncio.Task[None] | None:
        """Extend the message's lease while it is being handled."""
        deadline_ms = self._client._connection.ack_deadline_ms
        if not deadline_ms:
            return None
        return asyncio.get_running_loop().create_task(self._extend_loop(message, deadline_ms))

    async def _extend_loop(self, message: Message, deadline_ms: int) -> None:
        # A third of the deadline leaves two chances before it passes.
        interval_s = max(deadline_ms / 3000, 0.05)
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self._client._transport().extend(self.name, message.idem)
            except errors.EnSyncError as exc:
                log.debug("could not extend the lease of %s: %s", message.idem, exc)
                return

    async def _release(self, message: Message, reason: str) -> None:
        try:
            await self._client._transport().release(self.name, message.idem, reason)
        except errors.EnSyncError as exc:
            # The lease then simply runs out; the engine redelivers anyway.
            log.debug("could not give back %s: %s", message.idem, exc)

    def _background(self, work: Awaitable[None]) -> None:
        async def run() -> None:
            await work

        task = asyncio.get_running_loop().create_task(run())
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _auto_ack(self, message: Message) -> None:
        # Acks are pipelined: the next message is handled while this ack is
        # on the wire, so throughput is not bound by the ack round trip.
        self._background(self._ack_quietly(message))

    async def _ack_quietly(self, message: Message) -> None:
        try:
            await self.ack(message.idem, message.block)
        except errors.EnSyncError as exc:
            self._client._report(exc)

    def _open(self, wire: Delivery) -> Message:
        try:
            plaintext = open_envelope(parse_envelope(wire.payload), self._key)
            payload = json.loads(plaintext)
        except errors.EnSyncMessageError as exc:
            raise errors.EnSyncMessageError(
                f"message {wire.idem} on {self.name!r} cannot be decrypted: {exc.message}"
            ) from exc
        except ValueError as exc:
            raise errors.EnSyncMessageError(
                f"message {wire.idem} on {self.name!r} is not JSON after decryption"
            ) from exc
        return Message(
            message_name=wire.name,
            idem=wire.idem,
            block=wire.block,
            payload=payload,
            # gRPC replays carry no time: 0 stands for "not said".
            timestamp=wire.created_at_ms or None,
            metadata=split_replay_info(metadata_object(wire.metadata))[0],
            sender=wire.sender,
            attempt=wire.attempt,
        )

    # ------------------------------------------------------------------ verbs

    async def ack(self, idem: str, block: int) -> None:
        """Acknowledge a message: it is done and will not be delivered again."""
        await self._client._transport().ack(self.name, idem, block)

    async def defer(self, idem: str, delay_ms: int = 1000, reason: str = "") -> int:
        """Deliver the message again after ``delay_ms`` (0 … 86 400 000).

        Returns the scheduled delivery time in epoch milliseconds.
        """
        if isinstance(delay_ms, bool) or not isinstance(delay_ms, int):
            raise errors.EnSyncValidationError("delay_ms must be an integer")
        if not 0 <= delay_ms <= MAX_DEFER_MS:
            raise errors.EnSyncValidationError(
                f"delay_ms {delay_ms} is outside 0..{MAX_DEFER_MS} (24 hours)"
            )
        return await self._client._transport().defer(self.name, idem, delay_ms, reason)

    async def discard(self, idem: str, reason: str = "") -> None:
        """Drop the message for good; it goes to the app's dead-letter list."""
        await self._client._transport().discard(self.name, idem, reason)

    async def replay(self, idem: str) -> Message:
        """Fetch a message of this app again by idem, whatever its state."""
        replay = await self._client._transport().replay(self.name, idem)
        message = self._open(replay.message)
        return Message(
            message_name=message.message_name,
            idem=message.idem,
            block=message.block,
            payload=message.payload,
            timestamp=message.timestamp,
            metadata=message.metadata,
            sender=message.sender,
            replay_info=ReplayInfo(
                is_replayed=True,
                replay_timestamp=replay.info.replayed_at_ms if replay.info else None,
                was_acknowledged=replay.info.was_acknowledged if replay.info else False,
            ),
        )

    async def pause(self, reason: str = "") -> None:
        """Stop deliveries to this client; unsettled ones go to other clients."""
        await self._client._connection.pause(self.name, reason)

    async def resume(self) -> None:
        """Undo :meth:`pause`: deliveries flow to this client again."""
        await self._client._connection.resume(self.name)

    async def unsubscribe(self, drain_timeout_s: float = 10.0) -> None:
        """Stop receiving this name; pending messages stay with the engine.

        A handler already running is let finish (up to ``drain_timeout_s``).
        """
        try:
            await self._client._connection.unsubscribe(self.name)
        finally:
            self._client._forget(self)
            await self._close(drain_timeout_s)

    async def _close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking up messages; let the handler in hand finish (up to
        ``drain_timeout_s``), then wait for the acks (and give-backs) it sent.

        Messages received but not yet handled stay unacked: the engine gives
        them to another client once this one's connection closes.
        """
        self._closing = True
        self._arrived.set()
        self._consumers.set()
        if drain_timeout_s > 0:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except TimeoutError:
                log.warning(
                    "a handler for %s did not finish within %g s; cancelling it",
                    self.name,
                    drain_timeout_s,
                )
        self._task.cancel()
        keeper = [self._keeper] if self._keeper is not None else []
        for task in keeper:
            task.cancel()
        await asyncio.gather(self._task, *keeper, return_exceptions=True)
        self._closed = True
        self._closed_event.set()
        if self._acks:
            # Acks already on the wire settle messages for good: let them land.
            await asyncio.wait(list(self._acks), timeout=max(drain_timeout_s, 1.0))

    def statistics(self) -> dict[str, Any]:
        """Buffered (not yet handled) messages and registered handlers."""
        return {
            "buffered": len(self._inbox) + self._for_iterators.qsize(),
            "handlers": len(self._handlers),
            "iterators": self._iterators,
        }
