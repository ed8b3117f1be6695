"""The connection component: heartbeats, reconnection, subscription replay.

It owns the current transport. The first connect fails fast (bad key, no
engine: the caller gets the error), after trying each engine URL once.
After that, a lost link is healed in the background: a pass over the
other URLs first (engine nodes sharing a store), then capped exponential
backoff with jitter between passes; a new connect (the engine issues a new
client id), every recorded subscription opened again and its pause state
restored, then a ``reconnect`` event. A subscription the
engine refuses during that replay is reported as an ``error`` event and the
connection is marked failed: never silently skipped.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ensync import errors
from ensync._tasks import raise_if_cancelled
from ensync.client.backoff import backoff_delay_s
from ensync.client.events import EventEmitter
from ensync.client.tasks import TaskOwner
from ensync.client.transport import ClientTransport, ConnectInfo, Deliver, Observer
from ensync.protocol.tags import client_tag

__all__ = ["Connection", "ConnectionOptions", "ConnectionState"]

log = logging.getLogger(__name__)


class ConnectionState(enum.Enum):
    """Where the connection stands."""

    IDLE = "idle"
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    FAILED = "failed"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class ConnectionOptions:
    """Timing of heartbeats and reconnection, in milliseconds."""

    heartbeat_interval_ms: int = 30_000
    reconnect_interval_ms: int = 5_000
    max_reconnect_delay_ms: int = 60_000
    max_reconnect_attempts: int = 5


@dataclass(slots=True)
class _Recorded:
    deliver: Deliver
    paused: str | None = None


class Connection:
    """Owns one logical connection to an engine across reconnects."""

    def __init__(
        self,
        factories: Sequence[Callable[[], ClientTransport]],
        app_key: str,
        options: ConnectionOptions,
        events: EventEmitter,
        *,
        log_level: int = logging.DEBUG,
        home: int = 0,
    ) -> None:
        if not factories:
            raise ValueError("a connection needs at least one engine to connect to")
        # One transport factory per engine URL; ``_current`` is the one in use.
        self._factories = list(factories)
        self._current = home % len(self._factories)
        self._app_key = app_key
        self._options = options
        self._events = events
        self._log_level = log_level
        self._transport: ClientTransport | None = None
        self._subscriptions: dict[str, _Recorded] = {}
        self._observations: dict[str, Observer] = {}
        self._state = ConnectionState.IDLE
        # The heartbeat, and the reconnection while one runs.
        self._tasks = TaskOwner()
        self._connected = asyncio.Event()
        # The current link's ids (a reconnect gets new ones).
        self.client_id = ""
        self.client_hash = ""
        self.ack_deadline_ms: int | None = None
        self.max_payload_bytes: int | None = None
        # The connected app's id when the engine says.
        self.app_id: str | None = None
        # Why the connection failed for good, once it has.
        self.failure: errors.EnSyncError | None = None
        self._failed_listeners: list[Callable[[errors.EnSyncError], None]] = []

    @property
    def state(self) -> ConnectionState:
        """Where the connection stands."""
        return self._state

    @property
    def transport(self) -> ClientTransport:
        """The live transport; raises EnSyncConnectionError while the link is down."""
        if self._state is not ConnectionState.CONNECTED or self._transport is None:
            raise self._down()
        return self._transport

    def _down(self) -> errors.EnSyncConnectionError:
        if self.failure is not None:
            error = errors.EnSyncConnectionError(
                f"the connection to the engine failed for good: {self.failure.message}"
            )
            error.__cause__ = self.failure
            return error
        return errors.EnSyncConnectionError(f"not connected to the engine ({self._state.value})")

    def on_failed(self, listener: Callable[[errors.EnSyncError], None]) -> None:
        """Call ``listener(error)`` once if the connection fails for good."""
        self._failed_listeners.append(listener)

    async def open(self) -> None:
        """Connect for the first time, trying each engine URL once.

        The last error propagates to the caller (a refused key at once).
        """
        count = len(self._factories)
        for step in range(count):
            index = (self._current + step) % count
            transport = self._factories[index]()
            try:
                info = await transport.connect(self._app_key, self._lost)
            except errors.EnSyncConnectionError:
                await transport.close()
                if step == count - 1:
                    raise
                continue
            except BaseException:
                await transport.close()
                raise
            self._current = index
            break
        self.app_id = info.app_id
        self._install(transport, info)
        self._tasks.start(self._heartbeat(), name="ensync-heartbeat")

    def _install(self, transport: ClientTransport, info: ConnectInfo) -> None:
        self._transport = transport
        self.client_id = info.client_id
        self.client_hash = info.client_hash
        self.ack_deadline_ms = info.ack_deadline_ms
        self.max_payload_bytes = info.max_payload_bytes
        self._state = ConnectionState.CONNECTED
        self._connected.set()
        log.log(self._log_level, "connected as client %s", client_tag(info.client_id))

    async def wait_connected(self, timeout_s: float) -> None:
        """Wait until the link is up; raises EnSyncConnectionError on timeout or failure."""
        if self._state is ConnectionState.CONNECTED:
            return
        if self._state in (ConnectionState.FAILED, ConnectionState.CLOSED):
            raise self._down()
        try:
            # _connected is also set when the connection fails or closes, to
            # wake waiters at once; the state says which it was.
            await asyncio.wait_for(self._connected.wait(), timeout_s)
        except TimeoutError:
            raise errors.EnSyncConnectionError("not reconnected in time") from None
        if self.state is not ConnectionState.CONNECTED:  # changed while we waited
            raise self._down()

    # ------------------------------------------------------------------ subscriptions

    async def subscribe(self, name: str, deliver: Deliver) -> None:
        """Subscribe on the current link, and record it for the next ones."""
        await self.transport.subscribe(name, deliver)
        self._subscriptions[name] = _Recorded(deliver)

    async def unsubscribe(self, name: str) -> None:
        """Unsubscribe, and forget the subscription."""
        self._subscriptions.pop(name, None)
        await self.transport.unsubscribe(name)

    async def observe(self, pattern: str, observer: Observer) -> None:
        """Observe on the current link, and record it for the next ones."""
        await self.transport.observe(pattern, observer)
        self._observations[pattern] = observer

    async def unobserve(self, pattern: str) -> None:
        """Stop observing (on the link, if it is up), and forget it."""
        if self._observations.pop(pattern, None) is None:
            return
        if self._state is ConnectionState.CONNECTED and self._transport is not None:
            await self._transport.unobserve(pattern)

    def consumed(self, name: str) -> None:
        """A delivery of ``name`` was taken up (flow control on the current link)."""
        if self._transport is not None and self._state is ConnectionState.CONNECTED:
            self._transport.consumed(name)

    async def pause(self, name: str, reason: str) -> None:
        """Pause on the current link; the next ones pause it again."""
        await self.transport.pause(name, reason)
        recorded = self._subscriptions.get(name)
        if recorded is not None:
            recorded.paused = reason

    async def resume(self, name: str) -> None:
        """Resume, on this link and the next ones."""
        await self.transport.resume(name)
        recorded = self._subscriptions.get(name)
        if recorded is not None:
            recorded.paused = None

    # ------------------------------------------------------------------ liveness

    async def _heartbeat(self) -> None:
        interval_s = self._options.heartbeat_interval_ms / 1000
        while True:
            raise_if_cancelled()
            await asyncio.sleep(interval_s)
            if self._state is not ConnectionState.CONNECTED or self._transport is None:
                continue
            transport = self._transport
            try:
                await transport.heartbeat()
            except errors.EnSyncError as exc:
                if transport is self._transport:
                    self._lost(exc)

    def _lost(self, cause: BaseException) -> None:
        if self._state is not ConnectionState.CONNECTED:
            return
        self._state = ConnectionState.RECONNECTING
        self._connected.clear()
        log.warning("connection to the engine lost: %s", cause)
        self._events.emit("disconnect", cause)
        self._tasks.start(self._reconnect(), name="ensync-reconnect")

    async def _reconnect(self) -> None:
        old = self._transport
        self._transport = None
        self.client_id = ""
        if old is not None:
            await old.close()
        opts = self._options
        count = len(self._factories)
        attempt = 0
        while self._state is ConnectionState.RECONNECTING:
            raise_if_cancelled()
            attempt += 1
            if opts.max_reconnect_attempts and attempt > opts.max_reconnect_attempts:
                self._fail(
                    errors.EnSyncConnectionError(
                        f"gave up reconnecting after {opts.max_reconnect_attempts} attempts"
                    )
                )
                return
            # With several engine nodes, the first attempts go to the others
            # at once (a moment of jitter apart); then the backoff applies.
            self._current = (self._current + 1) % count
            if attempt < count:
                delay = random.uniform(0, 0.25)
            else:
                delay = backoff_delay_s(
                    attempt - count + 1,
                    opts.reconnect_interval_ms,
                    opts.max_reconnect_delay_ms,
                    random.random(),
                )
            await asyncio.sleep(delay)
            transport = self._factories[self._current]()
            try:
                info = await transport.connect(self._app_key, self._lost)
                await self._replay_subscriptions(transport)
            except errors.EnSyncAuthError as exc:
                await transport.close()
                self._fail(exc)
                return
            except errors.EnSyncConnectionError as exc:
                await transport.close()
                log.log(self._log_level, "reconnect attempt %d failed: %s", attempt, exc)
                continue
            except errors.EnSyncError as exc:
                # The engine is reachable but refused to restore a
                # subscription: retrying will not help. Say so loudly.
                await transport.close()
                self._fail(exc)
                return
            except asyncio.CancelledError:
                # Closed mid-connect: the new transport may already hold a
                # session (and a stream) on the engine; do not leave it open.
                await transport.close()
                raise
            self._install(transport, info)
            self._events.emit("reconnect", attempt)
            return

    async def _replay_subscriptions(self, transport: ClientTransport) -> None:
        for name, recorded in list(self._subscriptions.items()):
            try:
                await transport.subscribe(name, recorded.deliver)
                if recorded.paused is not None:
                    await transport.pause(name, recorded.paused)
            except errors.EnSyncConnectionError:
                raise
            except errors.EnSyncError as exc:
                raise errors.EnSyncSubscriptionError(
                    f"could not restore the subscription to {name!r}: {exc.message}"
                ) from exc
        for pattern, observer in list(self._observations.items()):
            try:
                await transport.observe(pattern, observer)
            except errors.EnSyncConnectionError:
                raise
            except errors.EnSyncError as exc:
                raise errors.EnSyncSubscriptionError(
                    f"could not restore the observation of {pattern!r}: {exc.message}"
                ) from exc

    def _fail(self, exc: errors.EnSyncError) -> None:
        self._state = ConnectionState.FAILED
        self.failure = exc
        self._connected.set()  # wake waiters: they see FAILED
        log.error("connection failed for good: %s", exc)
        self._events.emit("error", exc)
        for listener in self._failed_listeners:
            try:
                listener(exc)
            except Exception:  # isolation boundary: one listener must not stop the others
                log.exception("a failure listener raised")

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Stop heartbeats and reconnection and close the transport. Idempotent."""
        if self._state is ConnectionState.CLOSED:
            return
        self._state = ConnectionState.CLOSED
        self._connected.set()  # wake waiters: they see CLOSED
        await self._tasks.close()
        if self._transport is not None:
            await self._transport.close()
            self._transport = None
