"""Storage backends of the engine behind one contract, :class:`Store`.

:func:`open_store` picks a backend from a URL (backends are imported only
when named):

=============================  ==============================================
``memory`` / ``memory:``       :class:`MemoryStore`, volatile
``sqlite:``                    :class:`SqliteStore` at ``DATA_DIR/ensync.db``
``sqlite:relative.db``         :class:`SqliteStore` at ``DATA_DIR/relative.db``
``sqlite:///abs/path.db``      :class:`SqliteStore` at ``/abs/path.db``
=============================  ==============================================
"""

from __future__ import annotations

import importlib
import pathlib
from typing import TYPE_CHECKING, Any

from .base import (
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
    from .memory import MemoryStore, MemoryStoreStatistics
    from .sqlite import SqliteStore, SqliteStoreStatistics

__all__ = [
    "AppExistsError",
    "AppRecord",
    "AppStore",
    "Appended",
    "Claim",
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
    "MemoryStore": ".memory",
    "MemoryStoreStatistics": ".memory",
    "SqliteStore": ".sqlite",
    "SqliteStoreStatistics": ".sqlite",
}
_DEFAULT_SQLITE_FILE = "ensync.db"
_PLANNED_SCHEMES = frozenset({"nats", "nats+tls", "tls", "jetstream"})


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module, __name__), name)


def open_store(url: str, data_dir: pathlib.Path) -> Store:
    """Build (but do not open) the store that ``url`` names.

    Relative sqlite paths are resolved against ``data_dir``. Call ``open()``
    on the result before use.

    Raises:
        ValueError: the URL names no supported backend; the message quotes it.
    """
    scheme, colon, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "memory" and (not colon or rest == ""):
        from .memory import MemoryStore

        return MemoryStore()
    if scheme == "sqlite" and colon:
        from .sqlite import SqliteStore

        return SqliteStore(_sqlite_path(url, rest, data_dir))
    if scheme in _PLANNED_SCHEMES and colon:
        raise ValueError(f"store URL {url!r}: the NATS JetStream backend is not supported yet")
    raise ValueError(
        f"unsupported store URL {url!r}: use 'memory:', 'sqlite:', 'sqlite:relative.db'"
        " or 'sqlite:///absolute/path.db'"
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
