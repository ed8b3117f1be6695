"""ensync: the EnSync engine and its Python SDK.

Publish end-to-end encrypted JSON messages to other apps and receive theirs::

    from ensync import EnSyncEngine

    engine = EnSyncEngine("grpc://localhost:50051")
    client = await engine.create_client(app_key, app_secret_key=secret_key)
    await client.publish("orders/created", [warehouse_app_id], {"orderId": "o-1"})

    sub = await client.subscribe("orders/created")
    sub.on(lambda message: print(message.payload))
"""

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
from ensync.models import Message, ReplayInfo

__version__ = "0.1.0"

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
    "ReplayInfo",
    "Subscription",
    "__version__",
]
