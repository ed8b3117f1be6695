"""The gRPC transport's view of one connected client: its Subscribe streams
and its session stream, and which of them carries a message (PROTOCOL.md
§2.5: each message on exactly one stream — for grpc-js clients the oldest,
for everyone else the oldest opened for that message's name)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ensync.protocol.agents import is_go_client, reads_oldest_stream_only
from ensync.server.core.model import Delivery, DeliverySink
from ensync.server.transports.session import SessionOutbox

__all__ = ["Client", "Stream"]


@dataclass(eq=False, slots=True)
class Stream:
    """One open Subscribe stream and its outbox."""

    name: str
    queue: asyncio.Queue[Delivery | None] = field(default_factory=asyncio.Queue)

    def push(self, delivery: Delivery) -> None:
        self.queue.put_nowait(delivery)

    def room(self, name: str, held: int, window: int) -> int:
        return window - held

    def end(self) -> None:
        self.queue.put_nowait(None)


@dataclass(eq=False, slots=True)
class Client:
    """The transport's view of one client id: its streams, in opening order."""

    client_id: str
    user_agent: str
    streams: list[Stream] = field(default_factory=list)
    # An Event-generation call marks an older grpc-js client, which reads
    # every stream it opens: route per name for it (PROTOCOL.md §2.5).
    event_generation: bool = False
    closed: bool = False
    # ensync's session stream, when the client opened one (session.py).
    session: SessionOutbox | None = None

    @property
    def go(self) -> bool:
        return is_go_client(self.user_agent)

    @property
    def oldest_stream_only(self) -> bool:
        return reads_oldest_stream_only(self.user_agent) and not self.event_generation

    def sink_for(self, name: str) -> DeliverySink | None:
        if self.closed:
            return None
        session = self.session
        if session is not None and session.deliveries_on:
            return session
        if not self.streams:
            return None
        if self.oldest_stream_only:
            return self.streams[0]
        for stream in self.streams:
            if stream.name == name:
                return stream
        return None

    def is_attached(self) -> bool:
        return bool(self.streams) or self.session is not None

    def close(self) -> None:
        self.closed = True
        for stream in self.streams:
            stream.end()
        if self.session is not None:
            self.session.close()
