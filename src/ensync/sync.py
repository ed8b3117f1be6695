"""A blocking client, for scripts, WSGI apps and notebooks.

The same engine, client and subscription as the asynchronous API, with
calls that block until done. Underneath, each `EnSyncEngine` runs the
asynchronous SDK on an event loop of its own, in a background thread: every
call here hands its work to that loop and waits, so delivery, leases,
reconnection and encryption are the asynchronous SDK's, unchanged. Use it
from any thread, also where an event loop already runs (a notebook).

For example:

    from ensync.sync import EnSyncEngine

    with EnSyncEngine("grpc://localhost:50051") as engine:
        client = engine.create_client(app_key, app_secret_key=secret)
        client.publish("orders/created", [warehouse_id], {"orderId": "o-1"})
        sub = client.subscribe("orders/created", auto_ack=False)
        message = sub.get(timeout=5)
        sub.ack(message.idem, message.block)

Handlers registered with `Subscription.on` run on worker threads, one
message of a subscription at a time. Settle with the subscription's verbs
(``sub.ack(message.idem, message.block)``): a `Message`'s own ``ack()`` is
a coroutine, for asynchronous code. An engine not closed when the process
exits is closed then (its clients say goodbye, so the engine gives their
unsettled messages to other clients at once).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import threading
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, Self, TypeVar

from ensync import errors
from ensync.client.client import EnSyncClient as AsyncClient
from ensync.client.connection import ConnectionState
from ensync.client.engine import NetworkEngine
from ensync.client.events import EventName
from ensync.client.subscription import Subscription as AsyncSubscription
from ensync.models import Message, PublishResult

__all__ = ["EnSyncClient", "EnSyncEngine", "Subscription"]

_T = TypeVar("_T")

# How long closing at interpreter exit may take, per engine.
_CLOSE_AT_EXIT_S = 5.0


class _LoopThread:
    """An event loop on a daemon thread, and blocking calls into it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="ensync-sync-loop", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def run(self, work: Coroutine[Any, Any, _T], timeout_s: float | None = None) -> _T:
        """Run ``work`` on the loop and wait for its result (or exception)."""
        if threading.current_thread() is self._thread:
            work.close()
            raise RuntimeError(
                "a blocking ensync.sync call was made on its own event loop's thread;"
                " from asynchronous code, use the asynchronous client (ensync)"
            )
        if self._loop.is_closed():
            work.close()
            raise errors.EnSyncConnectionError("the engine is closed")
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(timeout_s)
        except BaseException:
            # Ctrl-C or a timeout while waiting: the work stops too.
            future.cancel()
            raise

    def call(self, function: Callable[[], _T]) -> _T:
        """Call ``function()`` on the loop's thread and return its result."""

        async def call() -> _T:
            return function()

        return self.run(call())

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def stop(self) -> None:
        if not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10)


# Engines not closed yet, closed at exit: kept here (their threads would
# keep them running anyway) until they are.
_open_engines: set[EnSyncEngine] = set()


@atexit.register
def _close_at_exit() -> None:
    for engine in list(_open_engines):
        # The process is ending: a failure to close has no one to tell.
        with contextlib.suppress(Exception):
            engine.close(timeout_s=_CLOSE_AT_EXIT_S)


class EnSyncEngine:
    """A blocking engine: where blocking clients come from.

    Args:
        url: as for `ensync.EnSyncEngine` (``grpc://``, ``grpcs://``, a
            bare host) or, with ``ws://`` or ``wss://``, as for
            `ensync.websocket.EnSyncEngine`; or a list of URLs of one kind.
        **options: the options of that engine (``heartbeat_interval``,
            ``call_timeout``, ``max_reconnect_attempts``, ...).
        handler_threads: worker threads for handlers (default 8).

    For example:

        with EnSyncEngine("grpc://localhost:50051") as engine:
            client = engine.create_client(app_key, app_secret_key=secret)
    """

    def __init__(
        self,
        url: str | Sequence[str] = "grpc://localhost:50051",
        *,
        handler_threads: int = 8,
        **options: Any,
    ) -> None:
        if isinstance(handler_threads, bool) or not isinstance(handler_threads, int):
            raise errors.EnSyncValidationError("handler_threads must be an integer")
        if handler_threads < 1:
            raise errors.EnSyncValidationError("handler_threads must be at least 1")
        first = url if isinstance(url, str) else (url[0] if url else "")
        self._runner = _LoopThread()
        try:
            self._engine = self._runner.call(lambda: _network_engine(first, url, options))
        except BaseException:
            self._runner.stop()
            raise
        self._handlers = concurrent.futures.ThreadPoolExecutor(
            handler_threads, thread_name_prefix="ensync-handler"
        )
        self._closed = False
        _open_engines.add(self)

    def on(self, event: EventName, callback: Callable[..., Any]) -> Callable[[], None]:
        """Listen to ``"disconnect"``, ``"reconnect"`` or ``"error"``.

        ``callback`` runs on the engine's loop thread: keep it short.
        Returns a function that removes the listener.
        """
        remove = self._runner.call(lambda: self._engine.on(event, callback))
        return lambda: self._runner.call(remove)

    def create_client(self, app_key: str, *, app_secret_key: str | None = None) -> EnSyncClient:
        """Connect as the app owning ``app_key`` (see `ensync.EnSyncEngine.create_client`)."""
        client = self._runner.run(
            self._engine.create_client(app_key, app_secret_key=app_secret_key)
        )
        return EnSyncClient(self, client)

    def close(self, *, timeout_s: float | None = None) -> None:
        """Close every client and stop the engine's thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        _open_engines.discard(self)
        try:
            self._runner.run(self._engine.close(), timeout_s)
        finally:
            self._handlers.shutdown(wait=False, cancel_futures=True)
            self._runner.stop()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _run(self, work: Coroutine[Any, Any, _T]) -> _T:
        return self._runner.run(work)

    def _call(self, function: Callable[[], _T]) -> _T:
        return self._runner.call(function)


def _network_engine(first: str, url: str | Sequence[str], options: dict[str, Any]) -> NetworkEngine:
    if first.startswith(("ws://", "wss://")):
        from ensync.websocket import EnSyncEngine as WebSocketEngine

        return WebSocketEngine(url, **options)
    from ensync.client.engine import EnSyncEngine as GrpcEngine

    return GrpcEngine(url, **options)


class EnSyncClient:
    """A blocking client: one app's connection. Get one from `EnSyncEngine.create_client`."""

    def __init__(self, engine: EnSyncEngine, client: AsyncClient) -> None:
        self._engine = engine
        self._client = client

    @property
    def client_id(self) -> str:
        """The engine's id for the current connection."""
        return self._client.client_id

    @property
    def state(self) -> ConnectionState:
        """``CONNECTED``, ``RECONNECTING``, ``FAILED`` or ``CLOSED``."""
        return self._client.state

    def publish(
        self,
        message_name: str,
        recipients: Sequence[str],
        payload: Mapping[str, Any] | object,
        metadata: Mapping[str, Any] | None = None,
        *,
        hybrid: bool = False,
    ) -> str:
        """Encrypt and publish; the idem (see `ensync.EnSyncClient.publish`)."""
        return self._engine._run(
            self._client.publish(message_name, recipients, payload, metadata, hybrid=hybrid)
        )

    def publish_many(
        self,
        message_name: str,
        recipients: Sequence[str],
        payloads: Iterable[Mapping[str, Any] | object],
        metadata: Mapping[str, Any] | None = None,
        *,
        hybrid: bool = False,
    ) -> list[PublishResult]:
        """Publish many payloads at once; one result each (`ensync.EnSyncClient.publish_many`)."""
        materialised = list(payloads)  # read here, not on the loop's thread
        return self._engine._run(
            self._client.publish_many(
                message_name, recipients, materialised, metadata, hybrid=hybrid
            )
        )

    def subscribe(
        self,
        message_name: str,
        *,
        auto_ack: bool = True,
        app_secret_key: str | None = None,
        model: type[Any] | None = None,
    ) -> Subscription:
        """Start receiving ``message_name`` (see `ensync.EnSyncClient.subscribe`)."""
        subscription = self._engine._run(
            self._client.subscribe(
                message_name, auto_ack=auto_ack, app_secret_key=app_secret_key, model=model
            )
        )
        return Subscription(self._engine, subscription)

    def replay(self, idem: str, *, app_secret_key: str | None = None) -> Message:
        """A message of this app again, by idem, whatever its state."""
        return self._engine._run(self._client.replay(idem, app_secret_key=app_secret_key))

    def close(self, *, drain_timeout_s: float = 10.0) -> None:
        """Close this client: running handlers finish (up to ``drain_timeout_s``), then the link."""
        self._engine._run(self._client.close(drain_timeout_s=drain_timeout_s))

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class Subscription:
    """Blocking verbs for one subscription. Get one from `EnSyncClient.subscribe`."""

    def __init__(self, engine: EnSyncEngine, subscription: AsyncSubscription) -> None:
        self._engine = engine
        self._subscription = subscription

    @property
    def name(self) -> str:
        """The message name."""
        return self._subscription.name

    def on(self, handler: Callable[[Message], object]) -> Callable[[], None]:
        """Call ``handler(message)`` on a worker thread for every message.

        Messages of the subscription are handled one at a time, in order; with
        ``auto_ack`` a message is acked once its handlers returned, and one
        whose handler raised is given back. Returns a function that removes
        the handler.

        Raises:
            EnSyncValidationError: ``handler`` is not a plain function (an
                ``async def`` handler belongs to the asynchronous client).
        """
        if not callable(handler):
            raise errors.EnSyncValidationError("handler must be callable")
        if inspect.iscoroutinefunction(handler):
            raise errors.EnSyncValidationError(
                "ensync.sync runs handlers on worker threads: pass a plain function"
                " (async handlers belong to the asynchronous client, ensync)"
            )
        workers = self._engine._handlers

        async def on_a_worker(message: Message) -> None:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(workers, handler, message)

        remove = self._engine._call(lambda: self._subscription.on(on_a_worker))
        return lambda: self._engine._call(remove)

    def get(self, timeout: float | None = None) -> Message:
        """The next message within ``timeout`` seconds (see `ensync.Subscription.get`).

        Raises:
            TimeoutError: none came in time.
        """
        return self._engine._run(self._subscription.get(timeout))

    def fetch(self, count: int, timeout: float = 1.0) -> list[Message]:
        """Up to ``count`` messages that came within ``timeout`` seconds."""
        return self._engine._run(self._subscription.fetch(count, timeout))

    def ack(self, idem: str, block: int) -> None:
        """Acknowledge a message: it is done."""
        self._engine._run(self._subscription.ack(idem, block))

    def defer(self, idem: str, delay_ms: int = 1000, reason: str = "") -> int:
        """Deliver the message again after ``delay_ms``; the due time, epoch ms."""
        return self._engine._run(self._subscription.defer(idem, delay_ms, reason))

    def discard(self, idem: str, reason: str = "") -> None:
        """Drop the message for good, to the dead letters."""
        self._engine._run(self._subscription.discard(idem, reason))

    def replay(self, idem: str) -> Message:
        """Fetch a message of this app again by idem."""
        return self._engine._run(self._subscription.replay(idem))

    def pause(self, reason: str = "") -> None:
        """No new deliveries to this client until `resume`."""
        self._engine._run(self._subscription.pause(reason))

    def resume(self) -> None:
        """Deliveries flow to this client again."""
        self._engine._run(self._subscription.resume())

    def unsubscribe(self, drain_timeout_s: float = 10.0) -> None:
        """Stop receiving the name; a running handler may finish first."""
        self._engine._run(self._subscription.unsubscribe(drain_timeout_s))
