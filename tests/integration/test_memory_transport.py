"""The in-memory transport of ``ensync.testing``: what the behaviour suite
(tests/conformance/test_sdk_behaviour.py) does not show on its own.

A session the engine forgot or ended is a lost link, healed (or failed) by
the SDK's reconnection as over a network; deliveries spend credits; and
in-memory clients share an engine with network clients.
"""

from __future__ import annotations

import asyncio

from ensync import ConnectionState, EnSyncEngine, EnSyncError, Message
from ensync.client.session import SUBSCRIPTION_CREDIT
from ensync.testing import MemoryEngine, run_engine, run_memory_engine
from tests.support.timing import eventually, seconds

__all__: list[str] = []


async def test_a_session_the_engine_forgot_is_healed_by_a_reconnect() -> None:
    async with run_memory_engine() as server:
        alice = await server.create_app("alice")
        sdk = server.client_engine(reconnect_interval=20)
        reconnects: list[int] = []
        sdk.on("reconnect", reconnects.append)
        client = await sdk.create_client(alice.app_key, app_secret_key=alice.secret_key)
        sub = await client.subscribe("x")
        first = client.client_id
        server.engine.operations.gone(first)  # the client is not told
        # Refused as unknown: the client reconnects, and sends it again.
        idem = await asyncio.wait_for(client.publish("x", [alice.app_id], {"i": 1}), seconds(5))
        assert reconnects == [1]
        assert client.client_id not in ("", first)
        async for message in sub:  # the subscription was restored
            assert message.idem == idem
            break


async def test_a_session_the_engine_ended_is_a_lost_link() -> None:
    async with run_memory_engine() as server:
        alice = await server.create_app("alice")
        sdk = server.client_engine(reconnect_interval=20, max_reconnect_attempts=3)
        events: list[object] = []
        sdk.on("disconnect", events.append)
        sdk.on("error", events.append)
        client = await sdk.create_client(alice.app_key)
        await server.engine.apps.revoke("alice")  # ends the app's sessions
        await eventually(lambda: client.state is ConnectionState.FAILED)
        assert "the engine ended the session" in str(events[0])
        assert isinstance(events[-1], EnSyncError)
        assert events[-1].name == "EnSyncAuthError"  # the key is refused now


async def test_deliveries_wait_for_credit() -> None:
    async with run_memory_engine() as server:
        alice = await server.create_app("alice")
        client = await server.client_engine().create_client(
            alice.app_key, app_secret_key=alice.secret_key
        )
        sub = await client.subscribe("x")
        release = asyncio.Event()
        seen: list[Message] = []

        async def stuck(message: Message) -> None:
            seen.append(message)
            await release.wait()

        sub.on(stuck)
        for i in range(SUBSCRIPTION_CREDIT + 50):
            await client.publish("x", [alice.app_id], {"i": i})
        await eventually(server.engine.quiescent)
        # The credits granted at subscribe, and one for the message taken up.
        assert server.engine.statistics().in_flight == SUBSCRIPTION_CREDIT + 1
        release.set()
        await eventually(lambda: len(seen) == SUBSCRIPTION_CREDIT + 50, timeout_s=10)


async def test_memory_and_network_clients_share_an_engine() -> None:
    async with run_engine() as server:
        alice = await server.create_app("alice")
        bob = await server.create_app("bob")
        in_memory = MemoryEngine(server.engine)
        over_grpc = EnSyncEngine(server.grpc_url)
        try:
            here = await in_memory.create_client(alice.app_key, app_secret_key=alice.secret_key)
            there = await over_grpc.create_client(bob.app_key, app_secret_key=bob.secret_key)
            to_here: list[Message] = []
            to_there: list[Message] = []
            (await here.subscribe("x")).on(to_here.append)
            (await there.subscribe("x")).on(to_there.append)
            await here.publish("x", [bob.app_id], {"from": "memory"})
            await there.publish("x", [alice.app_id], {"from": "grpc"})
            await eventually(lambda: len(to_here) == len(to_there) == 1)
            assert (to_here[0].payload, to_here[0].sender) == ({"from": "grpc"}, bob.app_id)
            assert (to_there[0].payload, to_there[0].sender) == ({"from": "memory"}, alice.app_id)
        finally:
            await in_memory.close()
            await over_grpc.close()


async def test_observing_copies_without_taking() -> None:
    async with run_memory_engine() as server:
        alice = await server.create_app("alice")
        client = await server.client_engine().create_client(
            alice.app_key, app_secret_key=alice.secret_key
        )
        sub = await client.subscribe("orders/created")
        async with await client.observe("orders/#") as watching:
            idem = await client.publish("orders/created", [alice.app_id], {"i": 1})
            async for copy in watching:
                assert (copy.idem, copy.attempt, copy.payload) == (idem, 0, {"i": 1})
                break
        async for message in sub:  # the subscriber got it as if nobody watched
            assert (message.idem, message.attempt) == (idem, 1)
            break
        assert server.engine.stats.observed == 1
