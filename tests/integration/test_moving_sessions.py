"""Sessions that move between engine nodes over one JetStream store: an
official gRPC client connects once and sends its client id with every
call, so when a load balancer takes it to another node, that node takes
the session over."""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ensync._proto import ensync_pb2 as pb
from ensync.crypto import open_payload
from ensync.testing import TestServer, run_engine
from tests.integration.test_grpc_wire import Stub, next_item
from tests.support.nats import jetstream_store

__all__: list[str] = []


@contextlib.asynccontextmanager
async def two_nodes(
    tmp_path: pathlib.Path, **second_options: Any
) -> AsyncIterator[tuple[TestServer, TestServer, Stub, Stub]]:
    """Two engine nodes on one JetStream store, each with a raw gRPC stub."""
    store = jetstream_store(tmp_path)
    async with contextlib.AsyncExitStack() as stack:
        first = await stack.enter_async_context(run_engine(store))
        second = await stack.enter_async_context(run_engine(store, **second_options))
        on_first, on_second = Stub(first.grpc_port), Stub(second.grpc_port)
        stack.push_async_callback(on_first.channel.close)
        stack.push_async_callback(on_second.channel.close)
        yield first, second, on_first, on_second


async def test_a_client_id_from_one_node_works_on_another(tmp_path: pathlib.Path) -> None:
    async with two_nodes(tmp_path) as (first, second, on_first, on_second):
        alice = await first.create_app("alice")
        bob = await first.create_app("bob")
        sender = await on_first.connect(alice)
        receiver = await on_first.connect(bob)
        # Both move to the second node without connecting again.
        stream = on_second.subscribe(receiver, "orders/created")
        idem = await on_second.publish(sender, "orders/created", bob)
        delivered = await next_item(stream)
        assert delivered.message_idem == idem
        assert json.loads(open_payload(delivered.payload, bob.secret_key)) == {"a": 1}
        ack = await on_second.call(
            "AcknowledgeMessage",
            pb.AcknowledgeRequest(
                client_id=receiver,
                message_idem=idem,
                partition_block=delivered.partition_block,
                message_name="orders/created",
            ),
            pb.AcknowledgeResponse,
        )
        assert ack.success, ack.message
        beat = await on_second.call(
            "Heartbeat", pb.HeartbeatRequest(client_id=sender), pb.HeartbeatResponse
        )
        assert beat.success
        assert {sender, receiver} <= set(second.engine.sessions)


async def test_an_id_no_node_issued_or_of_a_revoked_app_is_refused(
    tmp_path: pathlib.Path,
) -> None:
    async with two_nodes(tmp_path) as (first, second, on_first, on_second):
        alice = await first.create_app("alice")
        beat = await on_second.call(
            "Heartbeat", pb.HeartbeatRequest(client_id="made-up"), pb.HeartbeatResponse
        )
        assert not beat.success
        client_id = await on_first.connect(alice)
        await first.engine.apps.revoke("alice")
        with pytest.raises(AssertionError, match="unknown client_id"):
            await on_second.publish(client_id, "orders/created", alice)
        assert client_id not in second.engine.sessions


async def test_a_moved_session_counts_against_the_apps_client_limit(
    tmp_path: pathlib.Path,
) -> None:
    async with two_nodes(tmp_path, max_clients_per_app=1) as (first, second, on_first, on_second):
        alice = await first.create_app("alice")
        await on_second.connect(alice)  # the one client the second node allows
        moved = await on_first.connect(alice)
        with pytest.raises(AssertionError, match="unknown client_id"):
            await on_second.publish(moved, "orders/created", alice)
        assert moved not in second.engine.sessions
