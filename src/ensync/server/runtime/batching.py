"""The publishes and acks of one loop turn, from every client, each sent to
the store as one batch.

Publishes go in one ``append`` (one transaction) and each is answered once
its batch is stored — from the commit's callback on the stores of one
machine (no task, and no loop turn between the commit and the answers),
from a task the driver owns on the others. Acks go in one ``settle`` write.
Whatever a batch leaves unanswered when the engine stops fails with "the
engine stopped": no caller waits forever.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from ensync.protocol.errors import STORE_UNAVAILABLE
from ensync.server.core.errors import ErrorCode, ServiceError
from ensync.server.core.observers import Observers
from ensync.server.core.service import Service
from ensync.server.store.base import Appended, NewMessage, StoreError

__all__ = ["Batches", "Spawn", "fail"]

log = logging.getLogger(__name__)

# Starts a coroutine as a task the driver owns (and counts as work in progress).
Spawn = Callable[[Coroutine[Any, Any, None], str], None]

_Pending = tuple[NewMessage, "asyncio.Future[str]"]
_Ack = tuple[str, str, "asyncio.Future[int | None]"]


def fail(futures: Sequence[asyncio.Future[Any]], error: ServiceError) -> None:
    """Fail every future of ``futures`` not answered yet."""
    for future in futures:
        if not future.done():
            future.set_exception(error)


class Batches:
    """This loop turn's publishes and acks, and the answers tasks still owe."""

    def __init__(
        self, service: Service, observers: Observers, *, spawn: Spawn, changed: Callable[[], None]
    ) -> None:
        self._service = service
        self._observers = observers
        self._spawn = spawn
        self._changed = changed
        self._publishes: list[_Pending] = []
        self._acks: list[_Ack] = []
        # Appends answered from a store's callback, running now.
        self._appending = 0
        # Answers of work handed to a task: failed by close() if the task
        # never ran (the engine stopped first).
        self._owed: set[asyncio.Future[Any]] = set()

    @property
    def waiting(self) -> int:
        """Publishes and acks waiting for their batch."""
        return len(self._publishes) + len(self._acks)

    @property
    def busy(self) -> bool:
        """A batch waits, or is appended from a store's callback."""
        return bool(self._publishes or self._acks or self._appending)

    def publish(self, message: NewMessage, answer: asyncio.Future[str]) -> None:
        """Store ``message`` with this turn's batch; ``answer`` gets its idem."""
        if not self._publishes:
            asyncio.get_running_loop().call_soon(self._flush_publishes)
        self._publishes.append((message, answer))

    def ack(self, client_id: str, idem: str, answer: asyncio.Future[int | None]) -> None:
        """Ack with this turn's batch; ``answer`` gets ``None`` or the refusal."""
        if not self._acks:
            asyncio.get_running_loop().call_soon(self._flush_acks)
        self._acks.append((client_id, idem, answer))

    def owe(self, answers: Sequence[asyncio.Future[Any]]) -> None:
        """A task will answer these: fail them at :meth:`close` if it never ran."""
        for answer in answers:
            self._owed.add(answer)
            answer.add_done_callback(self._owed.discard)

    def close(self) -> None:
        """Fail what waits for a batch or for a task that will not run."""
        stopped = ServiceError.stopped()
        publishes, self._publishes = self._publishes, []
        fail([answer for _, answer in publishes], stopped)
        acks, self._acks = self._acks, []
        fail([answer for _, _, answer in acks], stopped)
        owed, self._owed = list(self._owed), set()
        fail(owed, stopped)

    def _flush_publishes(self) -> None:
        batch, self._publishes = self._publishes, []
        if not batch:
            return
        messages = [message for message, _ in batch]

        def appended(outcome: list[Appended] | StoreError) -> None:
            self._appending -= 1
            if isinstance(outcome, StoreError):
                self._append_failed(batch, outcome)
            else:
                self._answer_appended(batch, outcome)

        self._appending += 1
        try:
            started = self._service.append_soon(messages, appended)
        except StoreError as exc:
            started = True
            appended(exc)
        except Exception:  # isolation boundary: a bug fails this batch, not the engine
            log.exception("appending a batch of publishes failed")
            self._appending -= 1
            fail([answer for _, answer in batch], ServiceError.internal())
            return
        if not started:
            self._appending -= 1
            self.owe([answer for _, answer in batch])
            self._spawn(self._append(batch), "ensync-append")

    async def _append(self, batch: list[_Pending]) -> None:
        try:
            results = await self._service.append([message for message, _ in batch])
        except StoreError as exc:
            self._append_failed(batch, exc)
            return
        except BaseException:
            fail([answer for _, answer in batch], ServiceError.stopped())
            raise
        self._answer_appended(batch, results)

    def _append_failed(self, batch: list[_Pending], exc: StoreError) -> None:
        failure = self._service.store_health.failed("publish", exc, count=len(batch))
        fail([answer for _, answer in batch], failure)

    def _answer_appended(self, batch: list[_Pending], results: list[Appended]) -> None:
        if self._observers:
            self._observers.copy([message for message, _ in batch], results)
        for (_, answer), result in zip(batch, results, strict=True):
            if answer.done():
                continue
            if result.error is not None:
                answer.set_exception(ServiceError(ErrorCode.UNAVAILABLE, STORE_UNAVAILABLE))
            else:
                answer.set_result(result.idem)

    def _flush_acks(self) -> None:
        acks, self._acks = self._acks, []
        if acks:
            self.owe([answer for _, _, answer in acks])
            self._spawn(self._ack_batch(acks), "ensync-ack")

    async def _ack_batch(self, acks: list[_Ack]) -> None:
        try:
            outcomes = await self._service.ack_many([(client, idem) for client, idem, _ in acks])
        except BaseException:
            fail([answer for _, _, answer in acks], ServiceError.stopped())
            raise
        finally:
            self._changed()
        for (_, _, answer), outcome in zip(acks, outcomes, strict=True):
            if answer.done():
                continue
            if outcome is None:
                answer.set_result(None)
            else:
                answer.set_exception(outcome)
