"""A subscription: handlers or ``async for``, and the per-message verbs.

Messages of one subscription are handled one at a time, in arrival order,
by a task the subscription owns. With handlers registered, every handler
sees every message; when all of them succeed and ``auto_ack`` is on, the
message is acked once. A handler that raises leaves the message unacked: it
is given back to the engine, which delivers it again after its redelivery
backoff (and dead-letters it after ``max_deliveries``), and the error is
reported through the engine's ``error`` event and the log. Without
handlers, messages go to ``async for`` loops or to ``get`` and ``fetch``.
With ``auto_ack`` a loop's message is acked when the loop body finishes for
it and asks for the next; one ``get`` or ``fetch`` returns is acked as it is
handed over. A loop left early (``break``, ``return``, an exception) gives
the message in hand back to the engine at once, for redelivery.

While a handler (or loop body) runs, the subscription extends the message's
lease before the engine's ack deadline passes, so a slow handler does not
cause a second delivery.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from ensync import errors
from ensync.client.handout import Handout
from ensync.client.leases import LeaseKeeper
from ensync.client.messages import DoesNotFit, open_typed, replayed
from ensync.client.subscription_link import (
    SubscriptionLink,
    SubscriptionStatistics,
    settle_quietly,
)
from ensync.client.tasks import TaskOwner
from ensync.client.transport import Delivery, SettleKind, Settlement
from ensync.crypto import OpeningKey
from ensync.models import Message, settled_by

__all__ = ["Handler", "Subscription", "SubscriptionLink", "SubscriptionStatistics"]

log = logging.getLogger(__name__)

Handler = Callable[[Message], Awaitable[object] | object]

MAX_DEFER_MS = 86_400_000


_BOTH_WAYS = (
    "subscription {name!r} has handlers and an async for loop: use one way to consume it"
    " (handlers with on(), or async for), not both"
)
_PULL_WITH_HANDLERS = (
    "subscription {name!r} has handlers: every message goes to them, so {verb}() would"
    " never get one; remove the handlers (the function on() returned) to pull"
)


class Subscription:
    """Messages of one name for one client. Get one from ``client.subscribe``.

    For example:

        sub = await client.subscribe("orders/created", auto_ack=False)
        remove = sub.on(handle)          # or: async for message in sub: ...
        await sub.ack(message.idem, message.block)
    """

    def __init__(
        self,
        link: SubscriptionLink,
        name: str,
        auto_ack: bool,
        key: OpeningKey,
        *,
        model: type[Any] | None = None,
    ) -> None:
        self._link = link
        self._model = model
        self.name = name
        self.auto_ack = auto_ack
        self._key = key
        self._handlers: list[Handler] = []
        self._inbox: deque[Delivery] = deque()
        # Keeps every message we hold (buffered or in a handler) leased.
        self._keeper: LeaseKeeper | None = None
        self._arrived = asyncio.Event()
        self._consumers = asyncio.Event()  # set while handlers or iterators exist
        self._iterators = 0
        # Opened messages for loops and pulls (without handlers).
        self._handout = Handout()
        self._pulls = 0  # get and fetch calls under way
        self._closed = False
        # Set by close: no new message is taken up; the one in hand finishes.
        self._closing = False
        # Set when the client's connection failed for good: iterators raise it.
        self._failure: errors.EnSyncError | None = None
        # Acks sent without a coroutine (the transport's futures).
        self._acks: set[asyncio.Future[Any]] = set()
        # Messages in a handler or loop body now; True once that code acked,
        # deferred or discarded it itself (then auto-ack must not undo it).
        self._in_hand: dict[str, bool] = {}
        # The dispatcher, and settlements sent in the background.
        self._tasks = TaskOwner()
        task = self._tasks.start(self._dispatch(), name=f"ensync-subscription-{name}")
        assert task is not None  # a new owner takes tasks
        self._task = task

    # ------------------------------------------------------------------ consuming

    def on(self, handler: Handler) -> Callable[[], None]:
        """Call ``handler(message)`` for every message (sync or async).

        Returns a function that removes the handler again.
        """
        if not callable(handler):
            raise errors.EnSyncValidationError("handler must be callable")
        if self._handout.waiting:
            # (A loop left with break no longer waits: handlers may follow it.)
            raise errors.EnSyncSubscriptionError(_BOTH_WAYS.format(name=self.name))
        self._handlers.append(handler)
        self._consumers.set()

        def remove() -> None:
            if handler in self._handlers:
                self._handlers.remove(handler)
            self._update_consumers()

        return remove

    async def __aiter__(self) -> AsyncIterator[Message]:
        if self._handlers:
            # Messages go to handlers first: an iterator would wait forever.
            raise errors.EnSyncSubscriptionError(_BOTH_WAYS.format(name=self.name))
        if self._failure is not None:
            raise self._failure
        self._iterators += 1
        self._consumers.set()
        try:
            while not self._closed:
                if self._handlers:
                    raise errors.EnSyncSubscriptionError(_BOTH_WAYS.format(name=self.name))
                message = await self._handout.take()
                if message is None:
                    return
                self._in_hand[message.idem] = False
                finished = False
                try:
                    yield message
                    finished = True
                finally:
                    self._let_go(message.idem)
                    settled = self._in_hand.pop(message.idem, False)
                    if not settled:
                        if finished and self.auto_ack:
                            self._auto_ack(message)
                        elif not finished:
                            # Left early (break, return, an exception: the
                            # loop closes this generator): given back now
                            # rather than when its lease runs out.
                            release = _release(self.name, message, "the consuming loop ended")
                            self._settle_in_background(release, report=False)
        finally:
            self._iterators -= 1
            self._update_consumers()

    def _update_consumers(self) -> None:
        if self._handlers or self._iterators or self._pulls:
            self._consumers.set()
        else:
            self._consumers.clear()

    def fail(self, error: errors.EnSyncError) -> None:
        """The client's connection failed for good: nothing more arrives.

        ``async for`` loops raise ``error``; handlers hear of it through the
        engine's ``"error"`` listeners.
        """
        if self._closed:
            return
        self._failure = error
        self._closing = True
        self._arrived.set()
        self._consumers.set()
        self._handout.end(error)

    def _deliver(self, wire: Delivery) -> None:
        """Called by the transport's reader for every delivery, in order."""
        self._inbox.append(wire)
        self._arrived.set()
        deadline_ms = self._link.ack_deadline_ms
        if deadline_ms and self._keeper is None:
            self._keeper = LeaseKeeper(deadline_ms, self._extend)
        if self._keeper is not None:
            self._keeper.hold(wire.idem)

    async def _extend(self, idem: str) -> object:
        return await self._link.transport().settle(Settlement(SettleKind.EXTEND, self.name, idem))

    def _let_go(self, idem: str) -> None:
        if self._keeper is not None:
            self._keeper.drop(idem)

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
            self._link.consumed(self.name)
            try:
                message = open_typed(wire, self._key, self._model)
            except DoesNotFit as exc:
                # Delivering it again cannot help: to the dead letters at once.
                self._let_go(wire.idem)
                discard = Settlement(SettleKind.DISCARD, self.name, wire.idem, reason=exc.reason)
                self._settle_in_background(discard, report=True)
                self._link.report(exc)
                continue
            except errors.EnSyncMessageError as exc:
                # Left unacked: the engine delivers it again and, if it never
                # becomes readable, dead-letters it after max_deliveries.
                self._let_go(wire.idem)
                self._link.report(exc)
                continue
            settled_by(message, self)
            if self._handlers:
                await self._run_handlers(message)
            else:
                await self._handout.put(message)

    async def _run_handlers(self, message: Message) -> None:
        failure: Exception | None = None
        self._in_hand[message.idem] = False
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
                    self._link.report(error)
        finally:
            self._let_go(message.idem)
            settled = self._in_hand.pop(message.idem, False)
        if settled:
            return  # the handler acked, deferred or discarded it itself
        if failure is not None:
            # Not reported if it fails: the lease then simply runs out, and
            # the engine redelivers anyway.
            release = _release(self.name, message, repr(failure)[:200])
            self._settle_in_background(release, report=False)
        elif self.auto_ack:
            self._auto_ack(message)

    def _auto_ack(self, message: Message) -> None:
        # Acks are pipelined: the next message is handled while this ack is
        # on the wire, so throughput is not bound by the ack round trip.
        ack = Settlement(SettleKind.ACK, self.name, message.idem, message.block)
        try:
            sent = self._link.transport().settle_soon(ack, self._link.report)
        except errors.EnSyncError as exc:
            self._link.report(exc)
            return
        if sent is None:
            self._settle_in_background(ack, report=True)
            return
        self._acks.add(sent)
        sent.add_done_callback(self._acks.discard)

    def _settle_in_background(self, settlement: Settlement, *, report: bool) -> None:
        self._tasks.start(
            settle_quietly(self._link, settlement, report=report),
            name=f"ensync-{settlement.kind.value}-{self.name}",
        )

    # ------------------------------------------------------------------ pulling

    # ``timeout`` as JetStream's and Pub/Sub's pulls spell it; for fetch it
    # ends the wait with what came, which a cancelling asyncio.timeout cannot.
    async def get(self, timeout: float | None = None) -> Message:  # noqa: ASYNC109
        """The next message, waiting at most ``timeout`` seconds (None: no limit).

        The message is yours to settle (``await message.ack()``) within the
        engine's ack deadline, or it is delivered again; on a subscription
        with ``auto_ack`` it is acked as it is handed over.

        For example:

            sub = await client.subscribe("orders/created", auto_ack=False)
            message = await sub.get(timeout=5)
            await message.ack()

        Raises:
            TimeoutError: no message came within ``timeout``.
            EnSyncSubscriptionError: the subscription has handlers, or ended.
            EnSyncConnectionError: the client's connection failed for good.
        """
        messages = await self._pull("get", 1, timeout)
        if not messages:
            raise TimeoutError(f"no message of {self.name!r} came within {timeout:g} s")
        return messages[0]

    async def fetch(self, count: int, timeout: float = 1.0) -> list[Message]:  # noqa: ASYNC109
        """Up to ``count`` messages: what came within ``timeout`` seconds.

        Returns once ``count`` messages are in hand or the time is up, with
        those that came (an empty list if none did). Each taken message lets
        the engine send one more, so a batch larger than what is buffered
        fills as the engine sends. Settle each as `get` says.

        For example:

            for message in await sub.fetch(100, timeout=2):
                await message.ack()

        Raises:
            EnSyncValidationError: ``count`` is not a positive integer.
            EnSyncSubscriptionError: the subscription has handlers, or ended.
            EnSyncConnectionError: the client's connection failed for good.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise errors.EnSyncValidationError(f"count must be a positive integer, not {count!r}")
        return await self._pull("fetch", count, timeout)

    async def _pull(self, verb: str, count: int, wait_s: float | None) -> list[Message]:
        if wait_s is not None and (
            isinstance(wait_s, bool) or not isinstance(wait_s, int | float) or wait_s < 0
        ):
            raise errors.EnSyncValidationError(f"timeout must be seconds >= 0, not {wait_s!r}")
        if self._handlers:
            raise errors.EnSyncSubscriptionError(
                _PULL_WITH_HANDLERS.format(name=self.name, verb=verb)
            )
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise errors.EnSyncSubscriptionError(f"subscription {self.name!r} has ended")
        taken: list[Message] = []
        self._pulls += 1
        self._consumers.set()
        try:
            loop = asyncio.get_running_loop()
            deadline = None if wait_s is None else loop.time() + wait_s
            while len(taken) < count:
                remaining = None if deadline is None else max(deadline - loop.time(), 0.0)
                try:
                    message = await self._handout.take(remaining)
                except TimeoutError:
                    break
                if message is None:
                    if not taken:
                        raise errors.EnSyncSubscriptionError(
                            f"subscription {self.name!r} has ended"
                        )
                    break
                self._let_go(message.idem)
                if self.auto_ack:
                    self._auto_ack(message)
                taken.append(message)
        finally:
            self._pulls -= 1
            self._update_consumers()
        return taken

    # ------------------------------------------------------------------ verbs

    async def ack(self, idem: str, block: int) -> None:
        """Acknowledge a message: it is done and will not be delivered again."""
        self._settling(idem)
        await self._link.transport().settle(Settlement(SettleKind.ACK, self.name, idem, block))

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
        self._settling(idem)
        defer = Settlement(SettleKind.DEFER, self.name, idem, delay_ms=delay_ms, reason=reason)
        when = await self._link.transport().settle(defer)
        return when if when is not None else 0

    async def discard(self, idem: str, reason: str = "") -> None:
        """Drop the message for good; it goes to the app's dead-letter list."""
        self._settling(idem)
        discard = Settlement(SettleKind.DISCARD, self.name, idem, reason=reason)
        await self._link.transport().settle(discard)

    def _settling(self, idem: str) -> None:
        # Settled by the code handling it: its auto-ack (or release) is skipped.
        if idem in self._in_hand:
            self._in_hand[idem] = True

    async def replay(self, idem: str) -> Message:
        """Fetch a message of this app again by idem, whatever its state."""
        replay = await self._link.transport().replay(self.name, idem)
        return replayed(open_typed(replay.message, self._key, self._model), replay.info)

    async def pause(self, reason: str = "") -> None:
        """Stop deliveries to this client; unsettled ones go to other clients."""
        await self._link.pause(self.name, reason)

    async def resume(self) -> None:
        """Undo `pause`: deliveries flow to this client again."""
        await self._link.resume(self.name)

    async def unsubscribe(self, drain_timeout_s: float = 10.0) -> None:
        """Stop receiving this name; pending messages stay with the engine.

        A handler already running is let finish (up to ``drain_timeout_s``).
        """
        try:
            await self._link.unsubscribe(self.name)
        finally:
            self._link.forget(self)
            await self._close(drain_timeout_s)

    async def _close(self, drain_timeout_s: float = 0.0) -> None:
        """Stop taking up messages, and let what is under way finish.

        The handler in hand may finish (up to ``drain_timeout_s``), then the
        acks (and give-backs) it sent are waited for.

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
        await asyncio.wait([self._task])
        if self._keeper is not None:
            await self._keeper.close()
        self._closed = True
        self._handout.end()
        # Settlements already sent settle messages for good: let them land,
        # then cancel what is still running.
        await self._tasks.wait(max(drain_timeout_s, 1.0), *self._acks)
        await self._tasks.close()

    def statistics(self) -> SubscriptionStatistics:
        """Buffered (not yet handled) messages, handlers, loops and kept leases."""
        return SubscriptionStatistics(
            buffered=len(self._inbox) + len(self._handout),
            handlers=len(self._handlers),
            iterators=self._iterators,
            leases_kept=len(self._keeper) if self._keeper is not None else 0,
        )


def _release(name: str, message: Message, reason: str) -> Settlement:
    """Giving ``message`` back unsettled, to be delivered again."""
    return Settlement(SettleKind.RELEASE, name, message.idem, reason=reason)
