"""The NATS JetStream backend (``--store nats://...``); needs ``ensync[cluster]``."""

from ensync.server.store.jetstream.store import JetStreamStore
from ensync.server.store.jetstream.streams import StreamConfigError

__all__ = ["JetStreamStore", "StreamConfigError"]
