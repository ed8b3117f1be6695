"""Storage backends of the engine behind one contract, :class:`Store`.

:func:`open_store` picks a backend from a URL (backends are imported only
when named):

=============================  ==============================================
``memory`` / ``memory:``       :class:`MemoryStore`, volatile
``sqlite:``                    :class:`SqliteStore` at ``DATA_DIR/ensync.db``
``sqlite:relative.db``         :class:`SqliteStore` at ``DATA_DIR/relative.db``
``sqlite:///abs/path.db``      :class:`SqliteStore` at ``/abs/path.db``
``nats://HOST:PORT[,...]``     :class:`~.jetstream.cluster_store.ClusterStore`
                               on those NATS servers, one owner per partition
                               (``tls://`` for TLS; ``?replicas=3`` and
                               ``?namespace=NAME`` options: replicas of the
                               streams it creates, and that existing ones
                               must have; without it, existing streams are
                               used as they are)
=============================  ==============================================
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import urllib.parse
from typing import TYPE_CHECKING, Any

from ensync.server.store.base import (
    Appended,
    AppExistsError,
    AppRecord,
    AppStore,
    Claim,
    DeliveryPolicy,
    DeliveryState,
    Lease,
    MessageLog,
    MessageState,
    NewMessage,
    Release,
    Released,
    Settlement,
    Store,
    StoredMessage,
    StoreError,
)

if TYPE_CHECKING:
    from ensync.server.store.jetstream import ClusterStore
    from ensync.server.store.memory import MemoryStore, MemoryStoreStatistics
    from ensync.server.store.sqlite import SqliteStore, SqliteStoreStatistics

__all__ = [
    "AppExistsError",
    "AppRecord",
    "AppStore",
    "Appended",
    "Claim",
    "ClusterStore",
    "DeliveryPolicy",
    "DeliveryState",
    "Lease",
    "MemoryStore",
    "MemoryStoreStatistics",
    "MessageLog",
    "MessageState",
    "NewMessage",
    "Release",
    "Released",
    "Settlement",
    "SqliteStore",
    "SqliteStoreStatistics",
    "Store",
    "StoreError",
    "StoredMessage",
    "open_store",
    "sqlite_file",
]

_LAZY = {
    "ClusterStore": "ensync.server.store.jetstream",
    "MemoryStore": "ensync.server.store.memory",
    "MemoryStoreStatistics": "ensync.server.store.memory",
    "SqliteStore": "ensync.server.store.sqlite",
    "SqliteStoreStatistics": "ensync.server.store.sqlite",
}
_DEFAULT_SQLITE_FILE = "ensync.db"
_NATS_SCHEMES = ("nats://", "tls://")
_NATS_OPTIONS = frozenset({"replicas", "namespace"})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def open_store(
    url: str,
    data_dir: pathlib.Path,
    *,
    nats_creds: pathlib.Path | None = None,
    nats_tls_ca: pathlib.Path | None = None,
    serve: bool = True,
) -> Store:
    """Build (but do not open) the store that ``url`` names.

    Relative sqlite paths are resolved against ``data_dir``; ``nats_creds``
    and ``nats_tls_ca`` are for ``nats://`` stores. Call ``open()`` on the
    result before use. Without ``serve`` a ``nats://`` store is a
    command's, not an engine node's: it owns no partition and asks the
    nodes that do.

    Raises:
        ValueError: the URL names no supported backend, or a backend whose
            Python package is missing; the message says what to do.
    """
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "memory" and (not colon or rest == ""):
        from ensync.server.store.memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite" and colon:
        from ensync.server.store.sqlite import SqliteStore

        return SqliteStore(_sqlite_path(url, rest, data_dir))
    if url.lower().startswith(_NATS_SCHEMES):
        return _jetstream(url, nats_creds, nats_tls_ca, serve=serve)
    raise ValueError(
        f"unsupported store URL {url!r}: use 'memory:', 'sqlite:', 'sqlite:relative.db',"
        " 'sqlite:///absolute/path.db' or 'nats://HOST:PORT[,nats://HOST:PORT...]'"
    )


def _jetstream(
    url: str, creds: pathlib.Path | None, tls_ca: pathlib.Path | None, *, serve: bool
) -> ClusterStore:
    servers_part, _, query = url.partition("?")
    servers = [server.strip() for server in servers_part.split(",") if server.strip()]
    for server in servers:
        parsed = urllib.parse.urlsplit(server)
        if f"{parsed.scheme}://" not in _NATS_SCHEMES or not parsed.hostname:
            raise ValueError(
                f"store URL {url!r}: {server!r} is not nats://HOST:PORT or tls://HOST:PORT"
            )
    options = urllib.parse.parse_qs(query, keep_blank_values=True)
    unknown = sorted(options.keys() - _NATS_OPTIONS)
    if unknown:
        raise ValueError(
            f"store URL {url!r}: unknown option {unknown[0]!r} (known: replicas, namespace)"
        )
    # Without ?replicas, existing streams are used as they are (see jetstream.streams).
    replicas = options.get("replicas", [None])[-1]
    if replicas not in (None, "1", "3", "5"):
        raise ValueError(f"store URL {url!r}: replicas must be 1, 3 or 5, not {replicas!r}")
    if importlib.util.find_spec("nats") is None:
        raise ValueError("the NATS JetStream store needs nats-py: pip install 'ensync[cluster]'")
    from ensync.server.store.jetstream import ClusterStore

    return ClusterStore(
        servers,
        namespace=options.get("namespace", ["ensync"])[-1],
        replicas=int(replicas) if replicas is not None else None,
        creds=str(creds) if creds is not None else None,
        tls_ca=str(tls_ca) if tls_ca is not None else None,
        serve=serve,
    )


def sqlite_file(url: str, data_dir: pathlib.Path) -> pathlib.Path | None:
    """The database file a ``sqlite:`` URL names, or ``None`` for another store.

    Raises:
        ValueError: as :func:`open_store`.
    """
    scheme, colon, rest = url.partition(":")
    if scheme.lower() != "sqlite" or not colon:
        return None
    return _sqlite_path(url, rest, data_dir)


def _sqlite_path(url: str, rest: str, data_dir: pathlib.Path) -> pathlib.Path:
    if rest == "":
        return data_dir / _DEFAULT_SQLITE_FILE
    if rest.startswith("///"):
        path = rest[2:]
    elif rest.startswith("//"):
        # sqlite://host/... would silently drop the host; refuse it.
        raise ValueError(f"store URL {url!r}: sqlite takes no host, write 'sqlite:///abs/path.db'")
    else:
        path = rest
    if path in ("", "/") or path.endswith("/"):
        raise ValueError(f"store URL {url!r} names a directory, not a database file")
    return data_dir / path  # an absolute path replaces data_dir
