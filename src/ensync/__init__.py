"""ensync: the EnSync engine and its Python SDK.

Publish end-to-end encrypted JSON messages to other apps and receive theirs::

    from ensync import EnSyncEngine

    engine = EnSyncEngine("grpc://localhost:50051")
    client = await engine.create_client(app_key, app_secret_key=secret_key)
    await client.publish("orders/created", [warehouse_app_id], {"orderId": "o-1"})

    sub = await client.subscribe("orders/created")
    sub.on(lambda message: print(message.payload))
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from ensync._version import __version__

# A library stays quiet unless asked: no "last resort" printing of the SDK's
# warnings when the application configured no logging (enable_logging=True
# is how it asks, see client/engine.py).
logging.getLogger("ensync").addHandler(logging.NullHandler())

if TYPE_CHECKING:
    from ensync.client import ConnectionState, EnSyncClient, EnSyncEngine, Subscription
    from ensync.errors import (
        EnSyncAckError,
        EnSyncAuthError,
        EnSyncConnectionError,
        EnSyncContinueError,
        EnSyncDeferError,
        EnSyncDiscardError,
        EnSyncError,
        EnSyncGenericError,
        EnSyncMessageError,
        EnSyncPauseError,
        EnSyncPublishError,
        EnSyncReplayError,
        EnSyncSubscriptionError,
        EnSyncTimeoutError,
        EnSyncValidationError,
    )
    from ensync.models import Message, PublishResult, ReplayInfo

__all__ = [
    "ConnectionState",
    "EnSyncAckError",
    "EnSyncAuthError",
    "EnSyncClient",
    "EnSyncConnectionError",
    "EnSyncContinueError",
    "EnSyncDeferError",
    "EnSyncDiscardError",
    "EnSyncEngine",
    "EnSyncError",
    "EnSyncGenericError",
    "EnSyncMessageError",
    "EnSyncPauseError",
    "EnSyncPublishError",
    "EnSyncReplayError",
    "EnSyncSubscriptionError",
    "EnSyncTimeoutError",
    "EnSyncValidationError",
    "Message",
    "PublishResult",
    "ReplayInfo",
    "Subscription",
    "__version__",
]

# Names are imported on first use, so that ``import ensync.server`` (the
# engine) or ``import ensync.protocol`` loads nothing of the SDK.
_HOMES = {
    **dict.fromkeys(("ConnectionState", "EnSyncClient", "EnSyncEngine", "Subscription"), "client"),
    **dict.fromkeys(("Message", "PublishResult", "ReplayInfo"), "models"),
}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'ensync' has no attribute {name!r}")
    module = importlib.import_module(f"ensync.{_HOMES.get(name, 'errors')}")
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
