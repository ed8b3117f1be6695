"""The NATS JetStream backend (``--store nats://...``); needs ``ensync[cluster]``."""

from .store import JetStreamStore
from .streams import StreamConfigError

__all__ = ["JetStreamStore", "StreamConfigError"]
