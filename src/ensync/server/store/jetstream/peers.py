"""Engine nodes asking each other over NATS: a partition's calls go to its owner.

Every node listens on ``<prefix>.rpc.<node>`` (core NATS, in no stream:
``<namespace>.peer``) and serves the calls of
:mod:`ensync.server.store.peer_calls` from its own
:class:`~.owned_store.OwnedStore` (:class:`PeerServer`); a node sends the
calls of one loop turn for one owner as one request (:class:`PeerClient`).
A call on a slot the node does not serve (any longer) is answered
:class:`~ensync.server.store.peer_calls.NotServed`, and the asking node
asks the new owner.

A node that claims from a partition it does not own waits for news of it
from the owner: the owner remembers which nodes claimed from each of its
partitions and publishes the keys that may have become claimable on
``<prefix>.note.<node>``, a message per node per loop turn. Notices are
core NATS messages and may be lost; the asking node also sends
:class:`~ensync.server.store.peer_calls.Watch` now and then, answered with
the partitions that have pending messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import orjson

from ensync._tasks import raise_if_cancelled
from ensync.server.store import peer_calls as calls
from ensync.server.store.base import StoreError
from ensync.server.store.idems import slot_in
from ensync.server.store.jetstream.api import NatsError
from ensync.server.store.jetstream.owned import NotOwnedError
from ensync.server.store.jetstream.owned_store import OwnedStore
from ensync.server.store.peer_calls import Failed, NotServed, PeerCall

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

__all__ = ["News", "PeerClient", "PeerServer", "keys_of_notes", "notes_subject", "rpc_subject"]

log = logging.getLogger(__name__)

Key = tuple[str, str]
# A partition another node owns is watched this long after this node last
# claimed from it.
_INTEREST_S = 120.0
_WATCH_EVERY_S = 2.0


def rpc_subject(prefix: str, node: str) -> str:
    return f"{prefix}.rpc.{node}"


def notes_subject(prefix: str, node: str) -> str:
    return f"{prefix}.note.{node}"


class PeerServer:
    """Serves one node's :class:`OwnedStore` to the other nodes.

    Args:
        nc: the node's NATS connection.
        store: the node's store (what it serves).
        prefix: the peers' subject prefix (``Names.peers_prefix``).
    """

    def __init__(self, nc: Client, store: OwnedStore, prefix: str) -> None:
        self._nc = nc
        self._store = store
        self._prefix = prefix
        self._subscription: Subscription | None = None
        self._stop_watching: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Which nodes claimed from each partition served here.
        self._interest: dict[Key, set[str]] = {}
        self._notes: dict[str, set[Key]] = {}
        self._flushing = False

    async def start(self) -> None:
        self._subscription = await self._nc.subscribe(
            rpc_subject(self._prefix, self._store.node), cb=self._on_request
        )
        self._stop_watching = self._store.watch(self._on_news)

    async def stop(self) -> None:
        if self._stop_watching is not None:
            self._stop_watching()
        if self._subscription is not None:
            with contextlib.suppress(NatsError):
                await self._subscription.unsubscribe()
            self._subscription = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _on_request(self, msg: Msg) -> None:
        # The subscription hands over one message at a time: answer each in
        # a task of its own, so that a call waiting for a write does not
        # hold the others.
        task = asyncio.create_task(self._answer(msg), name="ensync-peer-answer")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer(self, msg: Msg) -> None:
        try:
            batch = calls.decode_calls(msg.data)
        except ValueError as exc:
            log.warning("a peer sent what is not a batch of calls: %s", exc)
            return
        answers = await asyncio.gather(*(self._serve(call) for call in batch))
        try:
            await msg.respond(calls.encode_answers(batch, answers))
        except NatsError as exc:
            log.debug("answering a peer: %s", exc)

    async def _serve(self, call: PeerCall) -> Any:
        # The store's own calls, never a routing subclass's: what is not
        # served here is answered NotServed, not asked elsewhere again.
        store, own = self._store, OwnedStore
        try:
            slot = self._slot_of(call)
            if slot is not None and not store.serves(slot):
                return NotServed(slot)
            if isinstance(call, calls.Append):
                return await own.append(
                    store, call.batch, now_ms=call.now_ms, dedupe_since_ms=call.dedupe_since_ms
                )
            if isinstance(call, calls.ClaimFrom):
                self._interest.setdefault((call.recipient, call.name), set()).add(call.node)
                return await own.claim(
                    store,
                    call.recipient,
                    call.name,
                    limit=call.limit,
                    now_ms=call.now_ms,
                    policy=call.policy,
                )
            if isinstance(call, calls.Extend):
                return await own.extend(store, call.idem, call.token, call.deadline_ms)
            if isinstance(call, calls.ReleaseMany):
                return await own.release(
                    store, call.releases, now_ms=call.now_ms, policy=call.policy
                )
            if isinstance(call, calls.Defer):
                return await own.defer(store, call.idem, call.visible_at_ms, call.now_ms)
            if isinstance(call, calls.SettleMany):
                return await own.settle(store, call.settlements, now_ms=call.now_ms)
            if isinstance(call, calls.Get):
                return await own.get(store, call.idem)
            if isinstance(call, calls.Dead):
                return await own.list_dead(store, call.recipient, call.limit)
            if isinstance(call, calls.DeadRefs):
                return await own.list_dead_refs(store, call.recipient)
            if isinstance(call, calls.Redrive):
                return await own.redrive(store, call.idem, call.now_ms)
            if isinstance(call, calls.Backlog):
                return await own.backlog(
                    store,
                )
            return self._watch(call)
        except NotOwnedError as exc:
            return NotServed(exc.slot)
        except StoreError as exc:
            return Failed(str(exc))

    def _slot_of(self, call: PeerCall) -> int | None:
        """The one slot a call is about (None: all that are served here)."""
        store = self._store
        if isinstance(call, calls.Append):
            slots = {store.slot_of(m.recipient, m.name) for m in call.batch}
            for slot in slots:
                if not store.serves(slot):
                    return slot
            return None
        if isinstance(call, calls.ClaimFrom):
            return store.slot_of(call.recipient, call.name)
        if isinstance(call, calls.Extend | calls.Defer | calls.Get | calls.Redrive):
            return slot_in(call.idem, store.slot_count)
        if isinstance(call, calls.ReleaseMany) and call.releases:
            return slot_in(call.releases[0].idem, store.slot_count)
        if isinstance(call, calls.SettleMany) and call.settlements:
            return slot_in(call.settlements[0].idem, store.slot_count)
        return None

    def _watch(self, call: calls.Watch) -> list[Key]:
        pending = []
        for key in call.keys:
            if self._store.serves(self._store.slot_of(*key)):
                self._interest.setdefault(key, set()).add(call.node)
                if self._store.has_pending(key):
                    pending.append(key)
        return pending

    def _on_news(self, recipient: str, name: str) -> None:
        nodes = self._interest.get((recipient, name))
        if not nodes:
            return
        for node in nodes:
            self._notes.setdefault(node, set()).add((recipient, name))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().call_soon(self._send_notes)

    def _send_notes(self) -> None:
        self._flushing = False
        notes, self._notes = self._notes, {}
        for node, keys in notes.items():
            body = orjson.dumps([list(key) for key in keys])
            task = asyncio.create_task(
                self._publish(notes_subject(self._prefix, node), body), name="ensync-peer-note"
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _publish(self, subject: str, body: bytes) -> None:
        try:
            await self._nc.publish(subject, body)
        except NatsError as exc:
            log.debug("a notice to a peer was not sent: %s", exc)


class PeerClient:
    """Asks other nodes: the calls of one loop turn for one node, as one request.

    Args:
        nc: this node's NATS connection.
        prefix: the peers' subject prefix (``Names.peers_prefix``).
        timeout_s: how long an answer may take.
    """

    def __init__(self, nc: Client, prefix: str, *, timeout_s: float = 10.0) -> None:
        self._nc = nc
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._pending: dict[str, list[tuple[PeerCall, asyncio.Future[Any]]]] = {}
        self._flushing = False
        self._tasks: set[asyncio.Task[None]] = set()

    def call(self, node: str, call: PeerCall) -> asyncio.Future[Any]:
        """``call``'s answer from ``node``: its value, :class:`NotServed`, or
        :class:`Failed`. Raises (through the future) :class:`StoreError`
        when ``node`` does not answer."""
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[Any] = loop.create_future()
        self._pending.setdefault(node, []).append((call, answer))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)
        return answer

    async def close(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _flush(self) -> None:
        self._flushing = False
        pending, self._pending = self._pending, {}
        for node, items in pending.items():
            task = asyncio.create_task(self._ask(node, items), name="ensync-peer-ask")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _ask(self, node: str, items: Sequence[tuple[PeerCall, asyncio.Future[Any]]]) -> None:
        batch = [call for call, _ in items]
        try:
            reply = await self._nc.request(
                rpc_subject(self._prefix, node), calls.encode_calls(batch), timeout=self._timeout_s
            )
            answers: list[Any] | BaseException = calls.decode_answers(batch, reply.data)
        except (NatsError, TimeoutError, ValueError) as exc:
            answers = StoreError(f"node {node} did not answer: {exc!r}")
        except BaseException:
            for _, future in items:
                if not future.done():
                    future.set_exception(StoreError("the request to a peer was stopped"))
            raise
        for index, (_, future) in enumerate(items):
            if future.done():
                continue
            if isinstance(answers, BaseException):
                future.set_exception(answers)
            else:
                future.set_result(answers[index])


def keys_of_notes(data: bytes) -> list[Key]:
    """The partitions a notice names (ValueError if it is not one)."""
    try:
        return [(str(r), str(n)) for r, n in orjson.loads(data)]
    except (orjson.JSONDecodeError, TypeError, ValueError) as exc:
        raise ValueError(f"not a notice: {exc}") from None


class News:
    """News of the partitions this node claims from while other nodes own
    them: notices the owners send, and a :class:`Watch` every few seconds
    that recovers a notice lost.

    Args:
        node: this node's id.
        peers: how to ask the owners.
        owner_of: a partition's owner as last read (``None``: unknown).
        notify: tells this node's claimers that a partition has news.
    """

    def __init__(
        self,
        node: str,
        peers: PeerClient,
        owner_of: Callable[[Key], str | None],
        notify: Callable[[Key], None],
    ) -> None:
        self._node = node
        self._peers = peers
        self._owner_of = owner_of
        self._notify = notify
        self._waiting: dict[Key, float] = {}  # partition -> when last claimed

    def waiting_for(self, key: Key) -> None:
        """This node claimed from ``key``, which another node owns."""
        self._waiting[key] = time.monotonic()

    async def heard(self, msg: Msg) -> None:
        """A notice from an owner (the subscription's callback)."""
        try:
            keys = keys_of_notes(msg.data)
        except ValueError as exc:
            log.warning("a peer sent what is not a notice: %s", exc)
            return
        for key in keys:
            self._notify(key)

    async def watch_forever(self) -> None:
        while True:
            raise_if_cancelled()
            await asyncio.sleep(_WATCH_EVERY_S)
            try:
                await self.watch_once()
            except StoreError as exc:
                log.debug("watching partitions owned elsewhere: %s", exc)

    async def watch_once(self) -> None:
        """Ask each owner which of the partitions waited for have pending messages."""
        now = time.monotonic()
        by_owner: dict[str, list[Key]] = {}
        for key, used in list(self._waiting.items()):
            if now - used > _INTEREST_S:
                del self._waiting[key]
                continue
            owner = self._owner_of(key)
            if owner is not None and owner != self._node:
                by_owner.setdefault(owner, []).append(key)
        answers = await asyncio.gather(
            *(
                self._peers.call(node, calls.Watch(self._node, tuple(keys)))
                for node, keys in by_owner.items()
            ),
            return_exceptions=True,
        )
        for answer in answers:
            if isinstance(answer, list):
                for key in answer:
                    self._notify(key)
