"""The NATS JetStream backend (``--store nats://...``); needs ``ensync[cluster]``."""

from ensync.server.store.jetstream.cluster_store import ClusterStore
from ensync.server.store.jetstream.owned_store import OwnedStore
from ensync.server.store.jetstream.streams import StreamConfigError

__all__ = ["ClusterStore", "OwnedStore", "StreamConfigError"]
