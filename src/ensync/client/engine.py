"""``EnSyncEngine``: where clients come from, and where connection events go."""

from __future__ import annotations

import asyncio
import functools
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, Self

from ensync import errors
from ensync.client import wakeup
from ensync.client.client import EnSyncClient, check_key_owner
from ensync.client.connection import Connection, ConnectionOptions
from ensync.client.events import EventEmitter, EventName
from ensync.client.grpc_transport import GrpcClientTransport
from ensync.client.transport import ClientTransport
from ensync.crypto import Sealer, opening_key
from ensync.protocol.urls import EngineUrl, parse_engine_url

__all__ = ["BaseEngine", "EnSyncEngine", "NetworkEngine", "show_sdk_logs"]

log = logging.getLogger(__name__)


def _positive_ms(name: str, value: object, *, zero_ok: bool = False) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_ok else 1):
        bound = "zero or more" if zero_ok else "a positive integer"
        raise errors.EnSyncValidationError(f"{name} must be {bound} (milliseconds), not {value!r}")
    return value


def show_sdk_logs() -> None:
    """Print the SDK's records (INFO and up) on stderr, unless the application configured logging.

    An application's own logging setup is left alone.
    """
    sdk = logging.getLogger("ensync")
    if logging.getLogger().handlers or any(
        not isinstance(handler, logging.NullHandler) for handler in sdk.handlers
    ):
        return
    handler = logging.StreamHandler()  # stderr
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    sdk.addHandler(handler)
    if sdk.level == logging.NOTSET or sdk.level > logging.INFO:
        sdk.setLevel(logging.INFO)


class BaseEngine(ABC):
    """What every engine of the SDK shares: clients, their options, events.

    A subclass says where its clients connect (`_connectors`): the network
    engines (`NetworkEngine`) to URLs, ``ensync.testing.MemoryEngine`` to a
    core in the same process.
    """

    def __init__(
        self,
        *,
        reconnect_interval: int = 5_000,
        max_reconnect_attempts: int = 5,
        enable_logging: bool = False,
        keepalive_interval: int = 30_000,
        call_timeout: int = 30_000,
        sender_key_reuse_ms: int = 0,
    ) -> None:
        # Clients start on the engine nodes in turn, so they spread over them.
        self._next_home = 0
        self._options = ConnectionOptions(
            heartbeat_interval_ms=_positive_ms("heartbeat interval", keepalive_interval),
            reconnect_interval_ms=_positive_ms("reconnect_interval", reconnect_interval),
            max_reconnect_attempts=_positive_ms(
                "max_reconnect_attempts", max_reconnect_attempts, zero_ok=True
            ),
        )
        self._call_timeout_s = _positive_ms("call_timeout", call_timeout) / 1000
        # 0: a fresh ephemeral key pair per message (as the official clients);
        # above 0: one per recipient for that long (docs/security.md).
        self._sealer = Sealer(
            _positive_ms("sender_key_reuse_ms", sender_key_reuse_ms, zero_ok=True)
        )
        # enable_logging raises the SDK's routine records (connects, reconnect
        # attempts) from DEBUG to INFO, and shows them on stderr unless the
        # application configured logging of its own.
        self._log_level = logging.INFO if enable_logging else logging.DEBUG
        if enable_logging:
            show_sdk_logs()
        self._events = EventEmitter()
        self._clients: list[EnSyncClient] = []
        self._handle = _ClientHandle(self)
        self._closed = False
        # The loop whose signals this engine makes wake it (`wakeup`).
        self._woken: asyncio.AbstractEventLoop | None = None

    @abstractmethod
    def _connectors(self) -> Sequence[Callable[[], ClientTransport]]:
        """One factory of fresh, unconnected transports per engine node."""

    def on(self, event: EventName, callback: Callable[..., Any]) -> Callable[[], None]:
        """Listen to an event of this engine's clients.

        ``"disconnect"`` (its cause), ``"reconnect"`` (the attempt that
        succeeded) or ``"error"`` (an `EnSyncError`).

        Returns a function that removes the listener.
        """
        try:
            return self._events.on(event, callback)
        except ValueError as exc:
            raise errors.EnSyncValidationError(str(exc)) from None

    async def create_client(
        self, app_key: str, *, app_secret_key: str | None = None
    ) -> EnSyncClient:
        """Connect and authenticate as the app owning ``app_key``.

        Args:
            app_key: the key ``ensync app create`` printed.
            app_secret_key: the app's secret key, to decrypt received messages.

        Raises:
            EnSyncAuthError: the key was refused.
            EnSyncConnectionError: the engine cannot be reached.
            EnSyncValidationError: the secret key is malformed, or belongs
                to another app than ``app_key`` (every message would then
                fail to open and stay pending).
        """
        if self._closed:
            raise errors.EnSyncConnectionError("the engine is closed")
        if not isinstance(app_key, str) or not app_key:
            raise errors.EnSyncValidationError("app_key must be a non-empty string")
        secret = opening_key(app_secret_key) if app_secret_key is not None else None
        if self._woken is None:
            loop = asyncio.get_running_loop()
            if wakeup.hold(loop):
                self._woken = loop
        connectors = self._connectors()
        home = self._next_home
        self._next_home = (home + 1) % len(connectors)
        connection = Connection(
            connectors,
            app_key,
            self._options,
            self._events,
            log_level=self._log_level,
            home=home,
        )
        await connection.open()
        if secret is not None:
            try:
                check_key_owner(secret, connection.app_id)
            except errors.EnSyncValidationError:
                await connection.close()
                raise
        client = EnSyncClient(self._handle, connection, secret)
        self._clients.append(client)
        return client

    async def close(self) -> None:
        """Close every client of this engine. Idempotent.

        Asynchronous event listeners still running are cancelled.
        """
        self._closed = True
        clients = list(self._clients)
        self._clients.clear()
        await asyncio.gather(*(client.close() for client in clients))
        await self._events.close()
        if self._woken is not None:
            wakeup.release(self._woken)
            self._woken = None

    async def __aenter__(self) -> Self:
        """``async with EnSyncEngine(...) as engine:`` closes its clients at the end."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class _ClientHandle:
    """The engine as its clients see it (`EngineHandle`)."""

    __slots__ = ("_engine",)

    def __init__(self, engine: BaseEngine) -> None:
        self._engine = engine

    @property
    def sealer(self) -> Sealer:
        return self._engine._sealer

    @property
    def call_timeout_s(self) -> float:
        return self._engine._call_timeout_s

    def report(self, error: errors.EnSyncError) -> None:
        self._engine._events.emit("error", error)

    def closed(self, client: EnSyncClient) -> None:
        if client in self._engine._clients:
            self._engine._clients.remove(client)

    async def close_engine(self) -> None:
        await self._engine.close()


class NetworkEngine(BaseEngine):
    """An engine reached over the network at one or more URLs; see `EnSyncEngine`."""

    _transport_kind: str = "grpc"

    def __init__(
        self,
        url: str | Sequence[str],
        *,
        reconnect_interval: int = 5_000,
        max_reconnect_attempts: int = 5,
        enable_logging: bool = False,
        keepalive_interval: int = 30_000,
        call_timeout: int = 30_000,
        ca_file: str | None = None,
        sender_key_reuse_ms: int = 0,
    ) -> None:
        given = [url] if isinstance(url, str) else list(url)
        if not given:
            raise errors.EnSyncValidationError("give at least one engine URL")
        try:
            self.urls: list[EngineUrl] = [
                parse_engine_url(one, transport=self._transport_kind)  # type: ignore[arg-type]
                for one in given
            ]
        except (ValueError, TypeError) as exc:
            raise errors.EnSyncValidationError(str(exc)) from None
        # The first URL; the others are where clients go when it fails.
        self.url: EngineUrl = self.urls[0]
        super().__init__(
            reconnect_interval=reconnect_interval,
            max_reconnect_attempts=max_reconnect_attempts,
            enable_logging=enable_logging,
            keepalive_interval=keepalive_interval,
            call_timeout=call_timeout,
            sender_key_reuse_ms=sender_key_reuse_ms,
        )
        self._root_certificates: bytes | None = None
        if ca_file is not None:
            try:
                with open(ca_file, "rb") as handle:
                    self._root_certificates = handle.read()
            except OSError as exc:
                raise errors.EnSyncValidationError(
                    f"cannot read CA file {ca_file!r}: {exc}"
                ) from None

    @abstractmethod
    def _make_transport(self, url: EngineUrl) -> ClientTransport:
        """A fresh, unconnected transport to ``url``."""

    def _connectors(self) -> Sequence[Callable[[], ClientTransport]]:
        return [functools.partial(self._make_transport, url) for url in self.urls]


class EnSyncEngine(NetworkEngine):
    """The EnSync engine over gRPC.

    Args:
        url: ``grpc://host:port``, ``grpcs://host:port``, or a bare host
            (``localhost`` → plaintext :50051, others → TLS :443); or a
            list of them, engine nodes sharing one store: clients start on
            them in turn and, when theirs fails, reconnect to the others.
        heartbeat_interval: ms between heartbeats (default 30 000).
        reconnect_interval: base delay of the reconnect backoff, ms.
        max_reconnect_attempts: give up after this many (0: never).
        enable_logging: log connection life at INFO instead of DEBUG.
        call_timeout: deadline of every call, ms.
        ca_file: PEM file of a CA to trust for ``grpcs://``.
        sender_key_reuse_ms: 0 (the default) seals each message with a fresh
            ephemeral key pair, as the official clients do; above 0 one key
            pair per recipient is reused for that long, which makes sealing
            several times cheaper (forward secrecy per window instead of per
            message; see docs/security.md). The envelope is the same.

    For example:

        engine = EnSyncEngine("grpc://localhost:50051")
        client = await engine.create_client(app_key, app_secret_key=secret)
    """

    def __init__(
        self,
        url: str | Sequence[str] = "grpc://localhost:50051",
        *,
        heartbeat_interval: int = 30_000,
        reconnect_interval: int = 5_000,
        max_reconnect_attempts: int = 5,
        enable_logging: bool = False,
        call_timeout: int = 30_000,
        ca_file: str | None = None,
        sender_key_reuse_ms: int = 0,
    ) -> None:
        super().__init__(
            url,
            reconnect_interval=reconnect_interval,
            max_reconnect_attempts=max_reconnect_attempts,
            enable_logging=enable_logging,
            keepalive_interval=heartbeat_interval,
            call_timeout=call_timeout,
            ca_file=ca_file,
            sender_key_reuse_ms=sender_key_reuse_ms,
        )

    def _make_transport(self, url: EngineUrl) -> ClientTransport:
        return GrpcClientTransport(
            url,
            call_timeout_s=self._call_timeout_s,
            root_certificates=self._root_certificates,
        )
