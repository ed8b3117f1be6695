"""The engine's operations: the one object transports call.

Calls come in as values (:mod:`ensync.server.core.calls`), in batches where
a transport has several at once; answers are futures, one per call, in the
order of the calls. Deliveries and session ends go out through each
client's :class:`~ensync.server.core.model.SessionRouter`.

The publishes and acks of one loop turn, from every client, go to the store
in one batch each (:mod:`ensync.server.runtime.batching`); other
settlements run concurrently, each in a task the driver owns.

Whatever changes what the core should do next (a subscription, a settled
lease, a session that ended) tells the driver (``changed``), which runs the
core once per loop turn however many calls came in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ensync.server.core.calls import (
    Observe,
    Pause,
    Publish,
    Replay,
    Resume,
    Settle,
    SettleKind,
    Subscribe,
    Unsubscribe,
)
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.ids import client_tag
from ensync.server.core.model import ReplayResult, SessionInfo, SessionRouter
from ensync.server.core.observers import Observers, ObserverSink
from ensync.server.core.service import Service
from ensync.server.runtime.batching import Batches, Spawn

__all__ = ["Operations"]

log = logging.getLogger(__name__)

# Refused subscribes logged already, by (client, name); forgotten when full.
_REFUSALS_LOGGED = 10_000


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A caller that gave up leaves its answer unread: mark it read.
    if not future.cancelled():
        future.exception()


class Operations:
    """What transports call: sessions, publishes, settlements, subscriptions,
    replays and observations.

    Made by the :class:`~ensync.server.runtime.engine.Engine`, which passes
    the core's service, the observers, how to start owned tasks (``spawn``)
    and how to run the core again (``changed``). Usable between the
    engine's ``start`` and ``stop``.
    """

    def __init__(
        self, service: Service, observers: Observers, *, spawn: Spawn, changed: Callable[[], None]
    ) -> None:
        self._service = service
        self._admission = service.admission
        self._observers = observers
        self._spawn = spawn
        self._changed = changed
        self._open = False
        self.batches = Batches(service, observers, spawn=spawn, changed=changed)
        self._refusals_logged: set[tuple[str, str]] = set()

    # ------------------------------------------------------------------ state

    def open(self) -> None:
        """Take calls from now on (the engine started)."""
        self._open = True

    def close(self) -> None:
        """Refuse calls from now on; what waits for a batch fails."""
        self._open = False
        self.batches.close()

    def has_session(self, client_id: str) -> bool:
        """Whether ``client_id`` is a live session here."""
        return client_id in self._service.dispatcher.sessions

    # ------------------------------------------------------------------ sessions

    async def connect(self, app_key: str, router: SessionRouter) -> SessionInfo:
        """Authenticate an app key and open a session routed through ``router``."""
        info = await self._admission.connect(app_key, router)
        self._changed()
        return info

    async def adopt(self, client_id: str, router: SessionRouter) -> bool:
        """Take over a session another node opened (a store shared by several
        nodes); ``True`` if ``client_id`` is a session here now."""
        adopted = await self._admission.adopt(client_id, router)
        if adopted:
            self._changed()
        return adopted

    def heartbeat(self, client_id: str) -> bool:
        """Keep a session alive; ``False`` if the client id is unknown."""
        return self._admission.heartbeat(client_id)

    def gone(self, client_id: str) -> None:
        """The client is gone (it said goodbye, or its connection ended for
        good): its session ends and what it held is delivered again."""
        self._admission.disconnect(client_id)
        self._changed()

    def routes_changed(self, client_id: str) -> None:
        """A transport opened or closed an outbox of this client, or the
        client granted credit: its deliveries may flow differently."""
        self._admission.routes_changed(client_id)
        self._changed()

    # ------------------------------------------------------------------ publish

    async def publish(self, calls: Sequence[Publish]) -> list[asyncio.Future[str]]:
        """Check each publish, in order, and queue the accepted ones for the
        next batch.

        Returns one future per call: its idem once the batch holding it is
        stored, or the :class:`ServiceError` that refused or failed it.
        Publishes accepted one after the other are numbered, stored and
        delivered in that order, so a transport may pipeline them: await
        this call in order, await the futures in any order.
        """
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[str]] = []
        batches = self.batches
        for call in calls:
            answer: asyncio.Future[str] = loop.create_future()
            answer.add_done_callback(_retrieve)
            answers.append(answer)
            try:
                message = await self._service.prepare_publish(
                    call.client_id,
                    call.name,
                    call.payload,
                    call.recipient,
                    call.metadata,
                    call.payload_metadata,
                )
                if not self._open:
                    raise ServiceError(ErrorCode.UNAVAILABLE, "the engine is shutting down")
            except ServiceError as exc:
                answer.set_exception(exc)
                continue
            batches.publish(message, answer)
        return answers

    # ------------------------------------------------------------------ settle

    def settle(self, calls: Sequence[Settle]) -> list[asyncio.Future[int | None]]:
        """Settle messages; one future per call (see :class:`Settle` for what
        each kind answers, or the :class:`ServiceError` that refused it).

        Acks of one loop turn, from every client, are settled with one store
        write; the other kinds run concurrently.
        """
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[int | None]] = []
        for call in calls:
            answer: asyncio.Future[int | None] = loop.create_future()
            answer.add_done_callback(_retrieve)
            answers.append(answer)
            if not self._open:
                answer.set_exception(
                    ServiceError(ErrorCode.UNAVAILABLE, "the engine is shutting down")
                )
            elif call.kind is SettleKind.ACK:
                self.batches.ack(call.client_id, call.idem, answer)
            else:
                self.batches.owe([answer])
                self._spawn(self._settle_one(call, answer), "ensync-settle")
        return answers

    async def _settle_one(self, call: Settle, answer: asyncio.Future[int | None]) -> None:
        service, client, idem = self._service, call.client_id, call.idem
        try:
            if call.kind is SettleKind.DEFER:
                result: int | None = await service.defer(client, idem, call.delay_ms, call.reason)
            elif call.kind is SettleKind.DISCARD:
                await service.discard(client, idem, call.reason)
                result = None
            elif call.kind is SettleKind.EXTEND:
                result = await service.extend(client, idem)
            elif call.kind is SettleKind.RELEASE:
                result = await service.release(client, idem, call.reason)
            else:  # ACK goes through the batch
                raise ServiceError.invalid(f"cannot settle {call.kind} alone")
        except ServiceError as exc:
            if not answer.done():
                answer.set_exception(exc)
        except Exception:
            # Isolation boundary: the caller hears "internal error", the
            # log has the traceback, the engine goes on.
            log.exception("a settlement (%s) failed", call.kind.value)
            if not answer.done():
                answer.set_exception(ServiceError.internal())
        except BaseException:
            if not answer.done():
                answer.set_exception(ServiceError.stopped())
            raise
        else:
            if not answer.done():
                answer.set_result(result)
        finally:
            self._changed()

    # ------------------------------------------------------------------ subscriptions

    def subscribe(self, call: Subscribe) -> None:
        """Start delivering messages of the name to this client.

        Raises:
            ServiceError: refused (unknown client, bad name, denied, a limit).
        """
        try:
            self._service.subscribe(call.client_id, call.name)
        except ServiceError as exc:
            self.refused_subscribe(call, exc.message)
            raise
        self._changed()

    def refused_subscribe(self, call: Subscribe, reason: str) -> None:
        """Count a refused subscribe (a transport may refuse one itself); log
        it once per client and name (a client that retries at once must not
        flood the log)."""
        self._service.stats.subscribe_refusals += 1
        key = (call.client_id, call.name)
        if key in self._refusals_logged:
            return
        if len(self._refusals_logged) >= _REFUSALS_LOGGED:
            self._refusals_logged.clear()
        self._refusals_logged.add(key)
        log.info(
            "subscribe of client %s to %r refused: %s",
            client_tag(call.client_id) if call.client_id else "-",
            call.name[:100],
            reason,
        )

    def unsubscribe(self, call: Unsubscribe) -> bool:
        """Stop deliveries of the name; ``False`` if the client was not subscribed."""
        done = self._service.unsubscribe(call.client_id, call.name)
        self._changed()
        return done

    def pause(self, call: Pause) -> None:
        """No new deliveries of the name to this client; its unsettled ones go back."""
        self._service.pause(call.client_id, call.name, call.reason)
        self._changed()

    def resume(self, call: Resume) -> None:
        """Undo :meth:`pause`."""
        self._service.resume(call.client_id, call.name)
        self._changed()

    # ------------------------------------------------------------------ reads

    async def replay(self, call: Replay) -> ReplayResult:
        """Read back any message addressed to the caller's app."""
        return await self._service.replay(call.client_id, call.idem)

    def observe(self, call: Observe, sink: ObserverSink) -> bool:
        """Copy the app's new messages matching the pattern to ``sink``
        without leasing them (core/observers.py); with ``stop``, end that
        (``False`` if there was no such observation)."""
        session = self._admission.session(call.client_id)
        if call.stop:
            return self._observers.unobserve(session, call.pattern, sink)
        self._observers.observe(session, call.pattern, sink)
        return True
