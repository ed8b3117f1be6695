"""The SDK: a transport-neutral client over gRPC or WebSocket transports."""

from ensync.client.client import EnSyncClient
from ensync.client.connection import ConnectionState
from ensync.client.engine import EnSyncEngine
from ensync.client.subscription import Subscription

__all__ = ["ConnectionState", "EnSyncClient", "EnSyncEngine", "Subscription"]
