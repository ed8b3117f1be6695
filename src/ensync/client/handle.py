"""What a client needs from its engine, and the check of a secret key against an app."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ensync import errors
from ensync.crypto import OpeningKey, Sealer, x25519_public

if TYPE_CHECKING:
    from ensync.client.client import EnSyncClient

__all__ = ["EngineHandle", "check_key_owner"]


def check_key_owner(key: OpeningKey, app_id: str | None) -> None:
    """Refuse a secret key that cannot open what is sealed for ``app_id``.

    Raises:
        EnSyncValidationError: the key belongs to another app (its messages
            would never open, and would stay pending). ``app_id`` None: the
            engine did not say which app connected; nothing is checked.
    """
    if app_id is None or x25519_public(app_id) == key.x25519_public:
        return
    theirs = f"app id {key.app_id}" if key.app_id else "another app"
    raise errors.EnSyncValidationError(
        f"app_secret_key belongs to {theirs}, but app_key connects as app id {app_id}:"
        " pass the secret key printed with this app's key"
    )


class EngineHandle(Protocol):
    """What a client needs from the engine that made it, and nothing more.

    The engine hands each client one.
    """

    @property
    def sealer(self) -> Sealer:
        """Seals payloads for recipients, with the engine's key reuse policy."""
        ...

    @property
    def call_timeout_s(self) -> float:
        """How long a call may take, reconnections included."""
        ...

    def report(self, error: errors.EnSyncError) -> None:
        """Tell the engine's ``"error"`` listeners."""
        ...

    def closed(self, client: EnSyncClient) -> None:
        """``client`` closed: the engine no longer lists it."""
        ...

    async def close_engine(self) -> None:
        """Close the engine and all its clients (``client.close(True)``)."""
        ...
