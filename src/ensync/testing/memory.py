"""An engine in the test's own process, and SDK clients that reach it without sockets.

`MemoryTransport` is a `ClientTransport` that calls a running core engine's
operations seam (`ensync.server.runtime.operations.Operations`) directly:
publishes and settlements go in as call values and come back as futures,
deliveries and observed copies are handed to the client as the engine makes
them, and the engine ending a session is a lost link, as over a network. No
socket, no serialisation, no wire: what a test sees is the SDK and the
engine's semantics alone (leases, redelivery, pause, dead letters, replay).

`MemoryEngine` is the SDK engine over it (the same options and the same
clients as `ensync.EnSyncEngine`), and `run_memory_engine` runs a core
engine with no listener at all. For example:

    from ensync.testing import run_memory_engine

    async with run_memory_engine(ack_deadline_ms=300) as server:
        shop = await server.create_app("shop")
        sdk = server.client_engine()
        client = await sdk.create_client(shop.app_key, app_secret_key=shop.secret_key)
        await client.publish("orders/created", [shop.app_id], {"orderId": "o-1"})
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ensync import errors
from ensync.client.engine import BaseEngine
from ensync.client.session import SUBSCRIPTION_CREDIT
from ensync.client.transport import (
    ClientTransport,
    ConnectInfo,
    Deliver,
    LostCallback,
    Observer,
    SettleKind,
    Settlement,
    WireReplay,
)
from ensync.protocol.errors import UNKNOWN_SESSION
from ensync.protocol.records import Delivery, ReplayInfo
from ensync.server.config import EngineConfig
from ensync.server.core import calls
from ensync.server.core.apps import NewApp
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.runtime.engine import Engine
from ensync.server.store import open_store
from ensync.server.store.base import Store

__all__ = ["MemoryEngine", "MemoryServer", "MemoryTransport", "run_memory_engine"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

_KINDS = {
    SettleKind.ACK: calls.SettleKind.ACK,
    SettleKind.DEFER: calls.SettleKind.DEFER,
    SettleKind.DISCARD: calls.SettleKind.DISCARD,
    SettleKind.EXTEND: calls.SettleKind.EXTEND,
    SettleKind.RELEASE: calls.SettleKind.RELEASE,
}


class _Inbox:
    """The engine's view of one in-memory client (router and delivery sink).

    It is the client's `SessionRouter`, and the `DeliverySink` of every name
    it subscribed to. Deliveries spend the client's credits as on ensync's
    batched session: the SDK grants some per subscription and one more per
    message its application took up, and keeps leased what it holds
    meanwhile.
    """

    def __init__(self, session_window: int, ended: Callable[[], None]) -> None:
        self.routes: dict[str, Deliver] = {}
        self.credits: dict[str, int] = {}
        self.attached = True
        self._session_window = session_window
        self._ended = ended

    # SessionRouter

    def sink_for(self, name: str) -> _Inbox | None:
        return self if self.attached and name in self.routes else None

    def is_attached(self) -> bool:
        return self.attached

    def close(self) -> None:
        # The engine ended the session (expired, revoked, stopping).
        if self.attached:
            self.attached = False
            self._ended()

    # DeliverySink

    def room(self, name: str, held: int, window: int) -> int:
        return min(self.credits.get(name, 0), max(window, self._session_window) - held)

    def push(self, delivery: Delivery) -> None:
        self.credits[delivery.name] = self.credits.get(delivery.name, 0) - 1
        deliver = self.routes.get(delivery.name)
        if deliver is None:
            return
        try:
            deliver(delivery)
        except Exception:  # isolation boundary: the engine's driver called us
            log.exception("a delivery could not be handed over")


@dataclass(eq=False, slots=True)
class _Copies:
    """Where the engine puts observed copies of one pattern (an `ObserverSink`)."""

    observer: Observer

    def observed(self, delivery: Delivery) -> bool:
        try:
            # A copy carries no lease: attempt 0, as on the wire.
            self.observer.copied(dataclasses.replace(delivery, attempt=0))
        except Exception:  # isolation boundary: the engine's driver called us
            log.exception("an observed copy could not be handed over")
        return True  # the observation bounds what it keeps, and counts what it drops


class MemoryTransport:
    """A `ClientTransport` over a running engine in this process.

    Args:
        engine: the core engine, started (``server.engine`` of
            `run_memory_engine` or of `ensync.testing.run_engine`).

    Refusals are the errors the network transports raise for them (an
    unknown key is `EnSyncAuthError`, a refused settlement the verb's
    error); a session the engine ended or no longer knows is a lost link.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._ops = engine.operations
        self._client_id = ""
        self._lost: LostCallback | None = None
        self._lost_reported = False
        self._closed = False
        self._inbox = _Inbox(engine.config.session_window, self._ended)
        self._observations: dict[str, _Copies] = {}

    async def connect(self, app_key: str, lost: LostCallback) -> ConnectInfo:
        """Open a session for the app owning ``app_key``."""
        self._lost = lost
        try:
            info = await self._ops.connect(app_key, self._inbox)
        except ServiceError as exc:
            if exc.code is ErrorCode.UNAVAILABLE:
                raise errors.EnSyncConnectionError(f"the engine: {exc.message}") from exc
            raise errors.EnSyncAuthError(f"Authentication failed: {exc.message}") from exc
        self._client_id = info.client_id
        config = self._engine.config
        return ConnectInfo(
            info.client_id,
            info.client_hash,
            ack_deadline_ms=config.ack_deadline_ms,
            max_payload_bytes=config.max_payload_bytes,
            app_id=info.app_id,
        )

    async def heartbeat(self) -> None:
        """Keep the session alive; a session the engine forgot is a lost link."""
        self._check_open()
        if not self._ops.heartbeat(self._client_id):
            raise errors.EnSyncConnectionError("the engine no longer knows this client")

    async def publish(
        self,
        name: str,
        recipient: str,
        payload: str,
        metadata: str,
        payload_metadata: str | None,
    ) -> str:
        """Publish one envelope to one recipient; its idem once stored."""
        self._check_open()
        call = calls.Publish(self._client_id, name, payload, recipient, metadata, payload_metadata)
        (answer,) = await self._ops.publish([call])
        return await self._outcome(answer, errors.EnSyncPublishError)

    async def subscribe(self, name: str, deliver: Deliver) -> None:
        """Deliveries of ``name`` go to ``deliver`` from now on."""
        self._check_open()
        inbox = self._inbox
        inbox.routes[name] = deliver
        inbox.credits[name] = SUBSCRIPTION_CREDIT
        try:
            self._ops.subscribe(calls.Subscribe(self._client_id, name))
        except ServiceError as exc:
            inbox.routes.pop(name, None)
            inbox.credits.pop(name, None)
            raise self._refused(exc, errors.EnSyncSubscriptionError) from exc

    async def unsubscribe(self, name: str) -> None:
        """No more deliveries of ``name``."""
        self._check_open()
        try:
            self._ops.unsubscribe(calls.Unsubscribe(self._client_id, name))
        except ServiceError as exc:
            raise self._refused(exc, errors.EnSyncSubscriptionError) from exc
        self._inbox.routes.pop(name, None)
        self._inbox.credits.pop(name, None)

    def consumed(self, name: str) -> None:
        """One more credit for ``name``; the engine hears when it had none."""
        credits = self._inbox.credits
        if self._closed or name not in credits:
            return
        before = credits[name]
        credits[name] = before + 1
        if before <= 0:
            self._ops.routes_changed(self._client_id)

    async def settle(self, settlement: Settlement) -> int | None:
        """Settle one message; the answer `Settlement` describes."""
        self._check_open()
        (answer,) = self._ops.settle([self._settle_call(settlement)])
        return await self._outcome(answer, settlement.error)

    def settle_soon(
        self, settlement: Settlement, failed: Callable[[errors.EnSyncError], None]
    ) -> asyncio.Future[Any] | None:
        """Settle without awaiting; ``failed(error)`` hears of a refusal."""
        if self._closed:
            return None
        (answer,) = self._ops.settle([self._settle_call(settlement)])

        def answered(done: asyncio.Future[int | None]) -> None:
            if done.cancelled():
                return
            error = done.exception()
            if isinstance(error, ServiceError):
                failed(self._refused(error, settlement.error))

        answer.add_done_callback(answered)
        return answer

    def _settle_call(self, settlement: Settlement) -> calls.Settle:
        return calls.Settle(
            self._client_id,
            settlement.idem,
            _KINDS[settlement.kind],
            name=settlement.name or None,
            delay_ms=settlement.delay_ms,
            reason=settlement.reason,
        )

    async def replay(self, name: str, idem: str) -> WireReplay:
        """Read a message of the app back by idem."""
        self._check_open()
        try:
            result = await self._ops.replay(calls.Replay(self._client_id, idem, name or None))
        except ServiceError as exc:
            raise self._refused(exc, errors.EnSyncReplayError) from exc
        # A replay is not a delivery: attempt 1, as both wires say.
        message = dataclasses.replace(result.delivery, attempt=1)
        return WireReplay(message, ReplayInfo(result.replayed_at_ms, result.was_acknowledged))

    async def pause(self, name: str, reason: str) -> None:
        """No new deliveries of ``name``; the unsettled ones go back."""
        self._check_open()
        try:
            self._ops.pause(calls.Pause(self._client_id, name, reason))
        except ServiceError as exc:
            raise self._refused(exc, errors.EnSyncPauseError) from exc

    async def resume(self, name: str) -> None:
        """Undo `pause`."""
        self._check_open()
        try:
            self._ops.resume(calls.Resume(self._client_id, name))
        except ServiceError as exc:
            raise self._refused(exc, errors.EnSyncContinueError) from exc

    async def observe(self, pattern: str, observer: Observer) -> None:
        """Copies of the app's new messages matching ``pattern`` go to ``observer``."""
        self._check_open()
        existing = self._observations.get(pattern)
        if existing is not None:
            existing.observer = observer
            return
        copies = _Copies(observer)
        try:
            self._ops.observe(calls.Observe(self._client_id, pattern), copies)
        except ServiceError as exc:
            raise self._refused(exc, errors.EnSyncSubscriptionError) from exc
        self._observations[pattern] = copies

    async def unobserve(self, pattern: str) -> None:
        """Stop the copies for ``pattern``."""
        copies = self._observations.pop(pattern, None)
        if copies is not None and not self._closed:
            self._stop_observing(pattern, copies)

    def _stop_observing(self, pattern: str, copies: _Copies) -> None:
        try:
            self._ops.observe(calls.Observe(self._client_id, pattern, stop=True), copies)
        except ServiceError as exc:
            log.debug("could not stop observing %r: %s", pattern, exc.message)

    async def close(self) -> None:
        """End the session at once: what it held goes to other clients."""
        if self._closed:
            return
        self._closed = True
        attached = self._inbox.attached
        self._inbox.attached = False
        for pattern, copies in self._observations.items():
            self._stop_observing(pattern, copies)
        self._observations.clear()
        if self._client_id and attached:
            self._ops.gone(self._client_id)

    # ------------------------------------------------------------------ outcomes

    def _check_open(self) -> None:
        if self._closed:
            raise errors.EnSyncConnectionError("the connection is closed")

    async def _outcome(self, answer: asyncio.Future[_T], error: type[errors.EnSyncError]) -> _T:
        try:
            return await answer
        except ServiceError as exc:
            raise self._refused(exc, error) from exc
        except asyncio.CancelledError:
            # The engine dropped the answer (it stopped); we were not cancelled.
            task = asyncio.current_task()
            if answer.cancelled() and task is not None and task.cancelling() == 0:
                raise errors.EnSyncConnectionError("the engine stopped") from None
            raise

    def _refused(self, exc: ServiceError, error: type[errors.EnSyncError]) -> errors.EnSyncError:
        """The SDK's error for a refusal.

        A session the engine does not know is a lost link (the connection
        reconnects).
        """
        if exc.message.startswith(UNKNOWN_SESSION):
            lost = errors.EnSyncConnectionError(f"the engine dropped this session: {exc.message}")
            self._report_lost(lost)
            return lost
        return error(exc.message)

    def _ended(self) -> None:
        self._report_lost(errors.EnSyncConnectionError("the engine ended the session"))

    def _report_lost(self, cause: BaseException) -> None:
        if self._closed or self._lost_reported:
            return
        self._lost_reported = True
        if self._lost is not None:
            self._lost(cause)


class MemoryEngine(BaseEngine):
    """An SDK engine whose clients reach a core engine in this process.

    The clients are the SDK's own (`EnSyncClient`, `Subscription`, …), with
    reconnection, heartbeats and lease keeping; only the transport differs
    (`MemoryTransport`). Options are `ensync.EnSyncEngine`'s.

    Args:
        engine: the core engine, started: ``server.engine`` of
            `run_memory_engine` (or of `ensync.testing.run_engine`, to mix
            in-memory and network clients on one engine).

    For example:

        sdk = MemoryEngine(server.engine)
        client = await sdk.create_client(app.app_key, app_secret_key=app.secret_key)
        ...
        await sdk.close()
    """

    def __init__(
        self,
        engine: Engine,
        *,
        heartbeat_interval: int = 30_000,
        reconnect_interval: int = 5_000,
        max_reconnect_attempts: int = 5,
        enable_logging: bool = False,
        call_timeout: int = 30_000,
        sender_key_reuse_ms: int = 0,
    ) -> None:
        super().__init__(
            reconnect_interval=reconnect_interval,
            max_reconnect_attempts=max_reconnect_attempts,
            enable_logging=enable_logging,
            keepalive_interval=heartbeat_interval,
            call_timeout=call_timeout,
            sender_key_reuse_ms=sender_key_reuse_ms,
        )
        self.engine = engine

    def _connectors(self) -> Sequence[Callable[[], ClientTransport]]:
        return [functools.partial(MemoryTransport, self.engine)]


@dataclass(slots=True)
class MemoryServer:
    """A core engine running in this process, with no listener (`run_memory_engine`)."""

    __test__ = False  # not a pytest test class

    engine: Engine
    store: Store
    _sdks: list[MemoryEngine] = field(default_factory=list, init=False, repr=False)

    async def create_app(self, name: str) -> NewApp:
        """Register an app; returns its app key, app id and secret key."""
        return await self.engine.apps.create(name)

    def client_engine(self, **options: Any) -> MemoryEngine:
        """A `MemoryEngine` over this engine, closed with it when the block ends.

        Options are those of `ensync.EnSyncEngine`.
        """
        sdk = MemoryEngine(self.engine, **options)
        self._sdks.append(sdk)
        return sdk


@contextlib.asynccontextmanager
async def run_memory_engine(
    store: str = "memory:", data_dir: Path | None = None, **engine_options: Any
) -> AsyncIterator[MemoryServer]:
    """Run a core engine in this process, with no socket, until the block ends.

    Args:
        store: ``"memory:"`` (default) or ``"sqlite:"`` (in ``data_dir``).
        data_dir: where a sqlite store lives; a temporary directory if None.
        engine_options: `EngineConfig` fields, e.g. ``ack_deadline_ms=500``.

    On the way out, the SDK engines made with `MemoryServer.client_engine`
    are closed first, then the engine stops and the store closes.
    """
    config = dataclasses.replace(EngineConfig(), **engine_options)
    with contextlib.ExitStack() as directories:
        if data_dir is None:
            data_dir = Path(
                directories.enter_context(tempfile.TemporaryDirectory(prefix="ensync-"))
            )
        opened = open_store(store, data_dir)
        await opened.open()
        try:
            engine = Engine(opened, config)
            await engine.start()
            server = MemoryServer(engine, opened)
            try:
                yield server
            finally:
                for sdk in server._sdks:
                    await sdk.close()
                await engine.stop()
        finally:
            await opened.close()
