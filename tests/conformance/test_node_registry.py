"""The live nodes on a real nats-server: announce, renew, lapse, leave, one id once."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from ensync.server.store.jetstream.nodes import NodeIdInUseError, NodeRegistry
from tests.support.nats import owned_stream
from tests.support.timing import seconds


@pytest.fixture
async def registry() -> AsyncIterator[Callable[[str], NodeRegistry]]:
    """Registries of nodes on one stream of their own."""
    async with owned_stream("NODES") as stream:
        yield lambda node: NodeRegistry(stream.api, stream.name, stream.prefix, node, ttl_s=1)


async def test_nodes_join_leave_and_lapse(registry: Callable[[str], NodeRegistry]) -> None:
    a, b = registry("node-a"), registry("node-b")
    await a.announce({"grpc": "10.0.0.1:50051", "version": "0.1.0"})
    await b.announce({"grpc": "10.0.0.2:50051", "version": "0.1.0"})
    live = await a.live()
    assert sorted(live) == ["node-a", "node-b"]
    assert live["node-a"]["grpc"] == "10.0.0.1:50051"

    # A second node with a live node's id is refused, saying what to do.
    with pytest.raises(NodeIdInUseError, match="give this node another id"):
        await registry("node-a").announce({})

    await b.leave()
    assert sorted(await a.live()) == ["node-a"]

    # node-a keeps renewing while node-b's replacement stops: it lapses.
    c = registry("node-c")
    await c.announce({})
    deadline = asyncio.get_running_loop().time() + seconds(15)
    while "node-c" in await a.live():
        assert asyncio.get_running_loop().time() < deadline, "node-c's record did not lapse"
        assert await a.renew()
        await asyncio.sleep(0.2)
    assert sorted(await a.live()) == ["node-a"]
    assert not await c.renew()  # it learns it lapsed, and announces again
    await c.announce({})
    assert sorted(await a.live()) == ["node-a", "node-c"]


def test_node_ids_are_checked() -> None:
    with pytest.raises(ValueError, match="node id"):
        NodeRegistry(None, "S", "s", "a.b", ttl_s=5)  # type: ignore[arg-type]
