"""Connecting a store to NATS: one client, its JetStream API, the server checked."""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from ensync.server.store.base import StoreError
from ensync.server.store.jetstream.api import JetStreamApi, NatsError
from ensync.server.store.jetstream.layout import check_server_version

if TYPE_CHECKING:
    from nats.aio.client import Client

__all__ = ["connect"]


async def connect(
    servers: Sequence[str],
    *,
    name: str,
    creds: str | None = None,
    tls_ca: str | None = None,
    on_error: Callable[[Exception], Awaitable[None]] | None = None,
    on_disconnected: Callable[[], Awaitable[None]] | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
) -> tuple[Client, JetStreamApi]:
    """A NATS client that fails over between ``servers`` and never stops
    reconnecting once connected, with its started JetStream API.

    Raises:
        LayoutError: the server is older than the store needs.
        StoreError: no server answered (or nats-py is not installed).
    """
    try:
        import nats
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise StoreError(
            "the NATS JetStream store needs nats-py: pip install 'ensync[cluster]'"
        ) from exc
    options: dict[str, Any] = {
        "servers": list(servers),
        "name": name,
        "connect_timeout": 5,
        "max_reconnect_attempts": 2,
        "reconnect_time_wait": 0.5,
        # Closing waits this long at most for what is in flight.
        "drain_timeout": 5,
        "allow_reconnect": True,
    }
    for option, callback in (
        ("error_cb", on_error),
        ("disconnected_cb", on_disconnected),
        ("reconnected_cb", on_reconnected),
    ):
        if callback is not None:
            options[option] = callback
    if creds:
        options["user_credentials"] = creds
    if tls_ca:
        options["tls"] = ssl.create_default_context(cafile=tls_ca)
    try:
        nc = await nats.connect(**options)
    except (NatsError, OSError, TimeoutError) as exc:  # what nats-py's connect raises
        raise StoreError(f"cannot reach NATS at {', '.join(servers)}: {exc!r}") from exc
    # A few tries per server to connect; once connected, it never stops trying.
    nc.options["max_reconnect_attempts"] = -1
    api = JetStreamApi(nc)
    try:
        await api.start()
        version = nc.connected_server_version
        check_server_version(f"{version.major}.{version.minor}.{version.patch}")
    except BaseException:
        await nc.close()
        raise
    return nc, api
