"""The NATS JetStream backend (``--store nats://...``); needs ``ensync[cluster]``."""

from .store import JetStreamStore

__all__ = ["JetStreamStore"]
