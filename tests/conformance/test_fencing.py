"""Fencing by JetStream itself, as the partition owners will use it.

A new owner of a slot writes an epoch record on the slot's fence subject;
every batch an owner writes expects the fence subject's last sequence to be
its own epoch record. This checks, on a real nats-server, that JetStream
refuses the former owner's batch after a takeover, whole, and takes the new
owner's: the one assumption of the design that only the server can confirm
(docs/architecture.md, "One owner per partition").
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import nats
import pytest

from ensync.server.store.jetstream.api import ConflictError, JetStreamApi, Out
from tests.support.nats import nats_url


@pytest.fixture
async def stream() -> AsyncIterator[tuple[JetStreamApi, str]]:
    """An API on the session's nats-server, and a stream of its own (its subject prefix)."""
    connection = await nats.connect(nats_url())
    api = JetStreamApi(connection)
    await api.start()
    name = "FENCE_" + secrets.token_hex(4).upper()
    subjects = [f"{name.lower()}.>"]
    await api.request(
        f"$JS.API.STREAM.CREATE.{name}",
        {
            "name": name,
            "subjects": subjects,
            "storage": "memory",
            "allow_atomic": True,
            "allow_direct": True,
        },
    )
    try:
        yield api, name.lower()
    finally:
        await api.request(f"$JS.API.STREAM.DELETE.{name}")
        await api.stop()
        await connection.close()


async def test_a_former_owners_batch_is_refused_whole_after_a_takeover(
    stream: tuple[JetStreamApi, str],
) -> None:
    api, prefix = stream
    fence = f"{prefix}.f.7"
    log = f"{prefix}.p.7.app.orders"

    def batch(owner_epoch_seq: int, *blocks: int) -> list[Out]:
        # The first message carries the fence check; the batch is one unit.
        return [
            Out(
                log,
                f"block {block}".encode(),
                expect=owner_epoch_seq if i == 0 else None,
                expect_filter=fence if i == 0 else None,
            )
            for i, block in enumerate(blocks)
        ]

    # Owner A takes the slot (no epoch record yet: expects none) and writes.
    a_epoch = await api.atomic([Out(fence, b'{"node":"a","epoch":1}', expect=0)])
    await api.atomic(batch(a_epoch, 1, 2))

    # Owner B takes over: its epoch record expects A's.
    b_epoch = await api.atomic([Out(fence, b'{"node":"b","epoch":2}', expect=a_epoch)])

    # A, paused or cut off and not yet aware, writes again: refused, whole.
    with pytest.raises(ConflictError):
        await api.atomic(batch(a_epoch, 3, 4))
    # A second takeover by A with its stale view is refused too.
    with pytest.raises(ConflictError):
        await api.atomic([Out(fence, b'{"node":"a","epoch":3}', expect=a_epoch)])

    # B's batches go through, and nothing of A's refused batch was stored.
    last = await api.atomic(batch(b_epoch, 3, 4))
    stored = await api.get_after(prefix.upper(), log, 0, 10)
    assert [got.data for got in stored] == [b"block 1", b"block 2", b"block 3", b"block 4"]
    assert stored[-1].seq == last
