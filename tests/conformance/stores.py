"""The backends the store conformance suite runs against, and its helpers.

To add a backend, add a :class:`Backend` to :data:`BACKENDS`. Every store
call takes the time as an argument, so the suite runs on a fake clock: the
constant :data:`T0` and offsets from it.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from ensync.server.store import (
    Appended,
    AppRecord,
    Claim,
    DeliveryPolicy,
    MemoryStore,
    NewMessage,
    SqliteStore,
    Store,
)
from ensync.server.store.jetstream.cluster_store import ClusterStore
from tests.support.nats import namespace_for, nats_url

__all__ = [
    "BACKENDS",
    "NAME",
    "OTHER_NAME",
    "OTHER_RECIPIENT",
    "POLICY",
    "RECIPIENT",
    "SENDER",
    "T0",
    "Backend",
    "Location",
    "app",
    "append",
    "claim",
    "idems",
    "new",
]

RECIPIENT = "app-recipient"
OTHER_RECIPIENT = "app-other"
SENDER = "app-sender"
NAME = "orders/created"
OTHER_NAME = "orders/cancelled"
T0 = 1_700_000_000_000
POLICY = DeliveryPolicy(lease_ms=1_000, max_deliveries=3, backoff_ms=(0, 500, 2_000))
DEDUPE_WINDOW_MS = 600_000


@dataclass(frozen=True)
class Backend:
    """How to build a store of one backend in a directory."""

    name: str
    persistent: bool  # data outlives the store object
    group_commit: bool  # concurrent writes share commits
    factory: Callable[[pathlib.Path], Store]


BACKENDS = (
    Backend("memory", persistent=False, group_commit=False, factory=lambda _: MemoryStore()),
    Backend(
        "sqlite",
        persistent=True,
        group_commit=True,
        factory=lambda directory: SqliteStore(directory / "ensync.db"),
    ),
    Backend(
        "owned",
        persistent=True,
        group_commit=True,
        factory=lambda directory: ClusterStore(
            [nats_url()], namespace=namespace_for(directory), slots=16
        ),
    ),
)


class Location:
    """Builds stores of one backend that share one place; closes them all at teardown."""

    def __init__(self, backend: Backend, directory: pathlib.Path) -> None:
        self.backend = backend
        self.directory = directory
        self.created: list[Store] = []

    def new(self) -> Store:
        store = self.backend.factory(self.directory)
        self.created.append(store)
        return store

    async def open(self) -> Store:
        store = self.new()
        await store.open()
        return store

    async def close_all(self) -> None:
        for store in self.created:
            await store.close()


async def location_of(
    request: pytest.FixtureRequest, tmp_path: pathlib.Path
) -> AsyncIterator[Location]:
    place = Location(request.param, tmp_path)
    try:
        yield place
    finally:
        await place.close_all()


def new(idem: str, **changes: Any) -> NewMessage:
    """A publish to RECIPIENT/NAME unless ``changes`` say otherwise."""
    base = NewMessage(
        idem=idem,
        recipient=RECIPIENT,
        name=NAME,
        payload=f"ciphertext-of-{idem}",
        metadata='{"persist": true}',
        sender=SENDER,
        created_at_ms=T0,
    )
    return dataclasses.replace(base, **changes)


def app(name: str, **changes: Any) -> AppRecord:
    base = AppRecord(
        name=name,
        app_id=f"id-of-{name}",
        key_hash=f"hash-of-{name}".encode(),
        created_at_ms=5_000,
    )
    return dataclasses.replace(base, **changes)


async def append(store: Store, *messages: NewMessage, now_ms: int = T0) -> list[Appended]:
    return await store.append(
        list(messages), now_ms=now_ms, dedupe_since_ms=now_ms - DEDUPE_WINDOW_MS
    )


async def claim(
    store: Store,
    *,
    now_ms: int = T0,
    limit: int = 100,
    recipient: str = RECIPIENT,
    name: str = NAME,
    policy: DeliveryPolicy = POLICY,
) -> Claim:
    return await store.claim(recipient, name, limit=limit, now_ms=now_ms, policy=policy)


def idems(claimed: Claim) -> list[str]:
    return [lease.message.idem for lease in claimed.leases]
