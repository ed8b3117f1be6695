"""The client: one authenticated app connection, for publishing and subscribing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

from ensync import errors
from ensync._entropy import random_token
from ensync.client.connection import Connection, ConnectionState
from ensync.client.handle import EngineHandle, check_key_owner
from ensync.client.messages import open_message, replayed
from ensync.client.observation import Observation
from ensync.client.outgoing import (
    RecipientCheck,
    json_payload,
    metadata_json,
    payload_metadata_json,
)
from ensync.client.subscription import Subscription
from ensync.client.transport import ClientTransport
from ensync.client.typed import check_model
from ensync.crypto import (
    OpeningKey,
    opening_key,
    seal_hybrid,
)
from ensync.models import Message, PublishResult
from ensync.protocol.headers import IDEMPOTENCY_HEADER
from ensync.protocol.names import validate_name, validate_pattern

__all__ = ["EnSyncClient", "EngineHandle", "check_key_owner"]


class EnSyncClient:
    """An app's connection to the engine. Get one from ``engine.create_client``.

    For example:

        async with await engine.create_client(app_key, app_secret_key=secret) as client:
            await client.publish("orders/created", [warehouse_id], {"orderId": "o-1"})
    """

    def __init__(
        self,
        engine: EngineHandle,
        connection: Connection,
        secret: OpeningKey | None,
    ) -> None:
        self._engine = engine
        self._connection = connection
        self._secret = secret
        self._subscriptions: dict[str, Subscription] = {}
        self._observations: dict[str, Observation] = {}
        self._closed = False
        self._recipients = RecipientCheck()
        connection.on_failed(self._connection_failed)

    def _connection_failed(self, error: errors.EnSyncError) -> None:
        for subscription in list(self._subscriptions.values()):
            subscription.fail(error)
        for observation in list(self._observations.values()):
            observation.fail(error)

    @property
    def client_id(self) -> str:
        """The engine's id for the current connection (changes after a reconnect)."""
        return self._connection.client_id

    @property
    def client_hash(self) -> str:
        """The engine's hash of the current client id."""
        return self._connection.client_hash

    @property
    def state(self) -> ConnectionState:
        """``CONNECTED``, ``RECONNECTING``, ``FAILED`` or ``CLOSED``."""
        return self._connection.state

    # ------------------------------------------------------------------ publish

    async def publish(
        self,
        message_name: str,
        recipients: Sequence[str],
        payload: Mapping[str, Any] | object,
        metadata: Mapping[str, Any] | None = None,
        *,
        hybrid: bool = False,
    ) -> str:
        """Encrypt ``payload`` for each recipient and publish it.

        Args:
            message_name: e.g. ``"orders/status/updated"``.
            recipients: app ids (base64 Ed25519 public keys), at least one.
            payload: a JSON object: a mapping, a dataclass instance or a
                pydantic model (sent as its JSON dump).
            metadata: ``{"persist": bool, "headers": {str: str}, "ttl_ms": int}``;
                persist defaults to true.
            hybrid: seal the payload once for all recipients (the hybrid
                envelope; only Node clients and ensync can read it).

        Returns:
            The idem, or for several recipients their idems joined by ``,``
            in recipient order (as the official SDKs do).

        Every publish carries a random ``ensync-idempotency-key`` header. If
        the link breaks before the engine's answer arrives, the publish waits
        for the reconnection and is sent again with the same key, and the
        engine answers with the idem it already stored: no duplicate.

        Raises:
            EnSyncValidationError: bad name, recipients, payload or metadata.
            EnSyncPublishError: the engine refused.
            EnSyncConnectionError: the link stayed down for the whole call timeout.
        """
        self._check_open()
        self._check_publish(message_name, recipients)
        deadline = asyncio.get_running_loop().time() + self._engine.call_timeout_s
        sealed = self._seal(payload, recipients, metadata, hybrid)
        return await self._publish_sealed(deadline, message_name, recipients, *sealed)

    async def publish_many(
        self,
        message_name: str,
        recipients: Sequence[str],
        payloads: Iterable[Mapping[str, Any] | object],
        metadata: Mapping[str, Any] | None = None,
        *,
        hybrid: bool = False,
    ) -> list[PublishResult]:
        """Publish many payloads under one name at once; one result each, in order.

        Each payload is sealed and published as `publish` does (its own
        idempotency key), all of them together: on the batched session
        they travel in as few frames as fit. A payload that fails (not a
        JSON object, too large, refused) fails alone: its result holds the
        error and the others go on.

        For example:

            results = await client.publish_many("readings/taken", [app_id], readings)
            failed = [r for r in results if not r.ok]

        Raises:
            EnSyncValidationError: bad name, recipients or metadata (nothing
                is published).
        """
        self._check_open()
        self._check_publish(message_name, recipients)
        metadata_json(metadata, "")  # refused for all, before any is sent
        if metadata is not None and IDEMPOTENCY_HEADER in (metadata.get("headers") or {}):
            raise errors.EnSyncValidationError(
                f"metadata['headers'] sets {IDEMPOTENCY_HEADER!r} for every message of"
                " publish_many: the engine would keep only the first; leave it out (each"
                " message gets its own) or publish them one by one"
            )
        deadline = asyncio.get_running_loop().time() + self._engine.call_timeout_s

        async def one(payload: Mapping[str, Any] | object) -> PublishResult:
            try:
                sealed = self._seal(payload, recipients, metadata, hybrid)
                idem = await self._publish_sealed(deadline, message_name, recipients, *sealed)
            except errors.EnSyncError as exc:
                return PublishResult(idem=None, error=exc)
            return PublishResult(idem=idem, error=None)

        return list(await asyncio.gather(*(one(payload) for payload in payloads)))

    def _check_publish(self, message_name: str, recipients: Sequence[str]) -> None:
        try:
            validate_name(message_name)
        except ValueError as exc:
            raise errors.EnSyncValidationError(str(exc)) from None
        self._recipients.check(recipients)

    def _seal(
        self,
        payload: Mapping[str, Any] | object,
        recipients: Sequence[str],
        metadata: Mapping[str, Any] | None,
        hybrid: bool,
    ) -> tuple[list[str], str, str]:
        """The envelope for each recipient, the metadata and the payload's metadata."""
        payload, plaintext = json_payload(payload)
        limit = self._connection.max_payload_bytes
        if limit is not None and len(plaintext) > limit:
            # Checked here: an oversized request would otherwise fail as a
            # transport error (or a closed socket) rather than say why.
            raise errors.EnSyncPublishError(
                f"payload is {len(plaintext)} bytes of JSON, more than the engine's limit"
                f" of {limit} bytes"
            )
        metadata_text = metadata_json(metadata, random_token(16))
        payload_metadata = payload_metadata_json(payload, len(plaintext))
        if hybrid:
            envelope = seal_hybrid(plaintext, list(recipients))
            return [envelope] * len(recipients), metadata_text, payload_metadata
        sealer = self._engine.sealer
        now_ms = time.monotonic_ns() // 1_000_000
        envelopes = [sealer.seal(plaintext, recipient, now_ms) for recipient in recipients]
        return envelopes, metadata_text, payload_metadata

    async def _publish_sealed(
        self,
        deadline: float,
        message_name: str,
        recipients: Sequence[str],
        envelopes: list[str],
        metadata_text: str,
        payload_metadata: str,
    ) -> str:
        if len(recipients) == 1:  # the common case: no task per recipient
            return await self._publish_one(
                deadline, message_name, recipients[0], envelopes[0], metadata_text, payload_metadata
            )
        # Every publish runs to its end (none is left running behind a
        # failure); the first failure is raised.
        outcomes = await asyncio.gather(
            *(
                self._publish_one(
                    deadline, message_name, recipient, envelope, metadata_text, payload_metadata
                )
                for recipient, envelope in zip(recipients, envelopes, strict=True)
            ),
            return_exceptions=True,
        )
        idems: list[str] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            idems.append(outcome)
        return ",".join(idems)

    async def _publish_one(
        self,
        deadline: float,
        name: str,
        recipient: str,
        envelope: str,
        metadata_text: str,
        payload_metadata: str,
    ) -> str:
        """Publish to one recipient, riding out reconnections until ``deadline``."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                transport = self._transport()
                return await transport.publish(
                    name, recipient, envelope, metadata_text, payload_metadata
                )
            except errors.EnSyncConnectionError:
                remaining = deadline - loop.time()
                if self._closed or remaining <= 0:
                    raise
                # Raises EnSyncConnectionError if the link is not back in time.
                await self._connection.wait_connected(remaining)

    # ------------------------------------------------------------------ subscribe

    async def subscribe(
        self,
        message_name: str,
        *,
        auto_ack: bool = True,
        app_secret_key: str | None = None,
        model: type[Any] | None = None,
    ) -> Subscription:
        """Start receiving ``message_name``; returns the `Subscription`.

        Args:
            message_name: e.g. ``"orders/created"``.
            auto_ack: ack each message once its handlers (or loop body) succeed.
            app_secret_key: decrypt with this key instead of the client's.
            model: a dataclass or pydantic model class: ``message.payload`` is
                an instance of it. A message that does not fit is discarded to
                the dead letters at once (a redelivery cannot fix it), with the
                reason, and reported to ``"error"`` listeners.

        Raises:
            EnSyncValidationError: bad name, no secret key to decrypt with.
            EnSyncSubscriptionError: the engine refused, or already subscribed.
        """
        self._check_open()
        try:
            validate_name(message_name)
        except ValueError as exc:
            raise errors.EnSyncValidationError(str(exc)) from None
        if message_name in self._subscriptions:
            raise errors.EnSyncSubscriptionError(f"already subscribed to {message_name!r}")
        key = self._opening_key(app_secret_key, "subscribe")
        typed = check_model(model) if model is not None else None
        subscription = Subscription(_Link(self), message_name, auto_ack, key, model=typed)
        self._subscriptions[message_name] = subscription
        try:
            await self._connection.subscribe(message_name, subscription._deliver)
        except BaseException:
            self._subscriptions.pop(message_name, None)
            await subscription._close()
            raise
        return subscription

    async def observe(self, pattern: str, *, app_secret_key: str | None = None) -> Observation:
        """Watch the app's new messages whose names match ``pattern``, without taking them.

        The app's subscribers (this client's too) get every message as
        before, and the copies need no ack.

        ``pattern`` is a name or a pattern: ``*`` stands for one segment, a
        final ``#`` for any rest (``"orders/*"``, ``"#"``). Only names the app
        may subscribe to are copied. Needs an ensync engine (official engines
        do not offer it); survives reconnects (copies stored while the link
        was down are not sent). ``ensync tail`` is built on it.

        For example:

            async with await client.observe("orders/#") as watching:
                async for message in watching:
                    print(message.message_name, message.payload)

        Raises:
            EnSyncValidationError: bad pattern, no secret key to decrypt with.
            EnSyncSubscriptionError: the engine refused, or already observing
                ``pattern``.
        """
        self._check_open()
        try:
            validate_pattern(pattern)
        except ValueError as exc:
            raise errors.EnSyncValidationError(str(exc)) from None
        if pattern in self._observations:
            raise errors.EnSyncSubscriptionError(f"already observing {pattern!r}")
        key = self._opening_key(app_secret_key, "observe")
        observation = Observation(pattern, key, self._stop_observing)
        self._observations[pattern] = observation
        try:
            await self._connection.observe(pattern, observation)
        except BaseException:
            self._observations.pop(pattern, None)
            raise
        return observation

    async def replay(self, idem: str, *, app_secret_key: str | None = None) -> Message:
        """Fetch any message addressed to this client's app by idem, decrypted.

        Whatever its state (pending, acked, dead-lettered), it is not
        delivered again. ``Subscription.replay`` does the same.

        For example:

            message = await client.replay(idem)
            print(message.payload, message.replay_info.was_acknowledged)

        Raises:
            EnSyncReplayError: no such message for this app.
            EnSyncMessageError: it cannot be decrypted with the key.
        """
        self._check_open()
        key = self._opening_key(app_secret_key, "replay")
        replay = await self._connection.transport.replay("", idem)
        return replayed(open_message(replay.message, key), replay.info)

    async def _stop_observing(self, pattern: str) -> None:
        self._observations.pop(pattern, None)
        if self._closed:
            return
        # A link that is gone took the engine's side of the observation with it.
        with contextlib.suppress(errors.EnSyncConnectionError):
            await self._connection.unobserve(pattern)

    # ------------------------------------------------------------------ close

    async def close(self, close_engine: bool = False, *, drain_timeout_s: float = 10.0) -> None:
        """Close this client gracefully; with ``True`` the engine too.

        Subscriptions stop taking up messages, handlers already running finish
        (up to ``drain_timeout_s``, then they are cancelled), their acks are
        sent, and only then is the connection closed. Messages received but
        not handled go back to the engine for another client.
        """
        if not self._closed:
            subscriptions = list(self._subscriptions.values())
            self._subscriptions.clear()
            # Publishing stays possible until the handlers are done: a
            # handler may reply to the message it is handling.
            await asyncio.gather(*(s._close(drain_timeout_s) for s in subscriptions))
            self._closed = True
            for observation in list(self._observations.values()):
                await observation.close()
            await self._connection.close()
            self._engine.closed(self)
        if close_engine:
            await self._engine.close_engine()

    async def __aenter__(self) -> EnSyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # ------------------------------------------------------------------ internals

    def _opening_key(self, app_secret_key: str | None, verb: str) -> OpeningKey:
        """The key to decrypt with: the one given to ``verb``, else the client's."""
        if app_secret_key is not None:
            given = opening_key(app_secret_key)
            check_key_owner(given, self._connection.app_id)
            return given
        key = self._secret
        if key is None:
            raise errors.EnSyncValidationError(
                "no secret key to decrypt messages with: pass app_secret_key to "
                f"create_client or {verb}"
            )
        return key

    def _check_open(self) -> None:
        if self._closed:
            raise errors.EnSyncConnectionError("the client is closed")

    def _transport(self) -> ClientTransport:
        self._check_open()
        return self._connection.transport

    def _report(self, error: errors.EnSyncError) -> None:
        self._engine.report(error)

    def _forget(self, subscription: Subscription) -> None:
        if self._subscriptions.get(subscription.name) is subscription:
            del self._subscriptions[subscription.name]


class _Link:
    """The narrow view of a client that its subscriptions get (`SubscriptionLink`)."""

    __slots__ = ("_client",)

    def __init__(self, client: EnSyncClient) -> None:
        self._client = client

    @property
    def ack_deadline_ms(self) -> int | None:
        return self._client._connection.ack_deadline_ms

    def transport(self) -> ClientTransport:
        return self._client._transport()

    async def pause(self, name: str, reason: str) -> None:
        await self._client._connection.pause(name, reason)

    async def resume(self, name: str) -> None:
        await self._client._connection.resume(name)

    async def unsubscribe(self, name: str) -> None:
        await self._client._connection.unsubscribe(name)

    def report(self, error: errors.EnSyncError) -> None:
        self._client._report(error)

    def consumed(self, name: str) -> None:
        self._client._connection.consumed(name)

    def forget(self, subscription: Subscription) -> None:
        self._client._forget(subscription)
