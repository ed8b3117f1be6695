"""A cluster loses machines: 3 NATS servers (streams replicated 3 times,
every write fsynced), 2 engine nodes over them; a publisher starts on one
node, a subscriber on the other; mid-stream the subscriber's node and one
NATS server are SIGKILLed.

What must hold (the delivery contract across nodes):

* every publish that returned its idem is delivered;
* no message is delivered after its ack returned;
* the clients heal by themselves: the subscriber moves to the surviving
  node, the publisher keeps publishing (a publish refused while NATS
  elects new leaders is sent again with the same idempotency key, and
  stored once).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from pathlib import Path

import pytest

from ensync import EnSyncEngine, EnSyncError, Message
from ensync.protocol.headers import IDEMPOTENCY_HEADER
from ensync.testing.nats_server import nats_cluster
from ensync.testing.process import EngineProcess
from tests.faults.engine_process import register_shop_and_warehouse
from tests.support.timing import eventually, seconds

__all__: list[str] = []

pytestmark = [pytest.mark.slow, pytest.mark.timeout(seconds(300))]

NAME = "faults/cluster/orders"
TOTAL = 300
KILL_AFTER = 100
ACK_DEADLINE_MS = 2_000


async def test_a_cluster_loses_an_engine_node_and_a_nats_server_and_nothing_confirmed(
    tmp_path: Path,
) -> None:
    async with nats_cluster(tmp_path / "nats", size=3, sync="always") as servers:
        store = ",".join(server.url for server in servers) + "?replicas=3"
        shop, warehouse = await register_shop_and_warehouse(store, tmp_path)
        serve = ["--store", store, "--ack-deadline-ms", str(ACK_DEADLINE_MS)]
        nodes = [
            EngineProcess(tmp_path / f"node-{i}", serve_args=[*serve, "--log-level", "INFO"])
            for i in (1, 2)
        ]
        await asyncio.gather(*(node.start() for node in nodes))
        urls = [node.grpc_url for node in nodes]

        def engine(order: list[str]) -> EnSyncEngine:
            # Reconnect quickly and never give up; calls fail rather than hang.
            return EnSyncEngine(
                order, reconnect_interval=200, max_reconnect_attempts=0, call_timeout=5_000
            )

        publishing = engine(urls)  # starts on node 1
        subscribing = engine(urls[::-1])  # starts on node 2
        try:
            publisher = await publishing.create_client(shop.app_key)
            subscriber = await subscribing.create_client(
                warehouse.app_key, app_secret_key=warehouse.secret_key
            )
            confirmed: dict[int, str] = {}
            delivered: defaultdict[int, list[float]] = defaultdict(list)
            acked_at: dict[int, float] = {}
            refused: list[str] = []
            killed = asyncio.Event()

            async def handle(message: Message) -> None:
                seq = message.payload["seq"]
                delivered[seq].append(time.monotonic())
                with contextlib.suppress(EnSyncError):  # its node may die meanwhile
                    await subscription.ack(message.idem, message.block)
                    acked_at.setdefault(seq, time.monotonic())

            subscription = await subscriber.subscribe(NAME, auto_ack=False)
            subscription.on(handle)

            async def publish_all() -> None:
                for seq in range(TOTAL):
                    if seq == KILL_AFTER:
                        killed.set()
                    deadline = time.monotonic() + seconds(60)
                    while True:
                        try:
                            confirmed[seq] = await publisher.publish(
                                NAME,
                                [warehouse.app_id],
                                {"seq": seq},
                                {"headers": {IDEMPOTENCY_HEADER: f"order-{seq}"}},
                            )
                            break
                        except EnSyncError as exc:
                            refused.append(f"{seq}: {exc}")
                            assert time.monotonic() < deadline, f"publish {seq} kept failing"
                            await asyncio.sleep(0.2)

            publishing_task = asyncio.create_task(publish_all())
            await killed.wait()
            await eventually(lambda: len(delivered) >= KILL_AFTER // 2, 30, "deliveries on node 2")
            await nodes[1].kill()
            servers[0].kill()
            killed_at = time.monotonic()
            await publishing_task
            await eventually(
                lambda: confirmed.keys() <= delivered.keys(),
                120,
                "every confirmed publish delivered",
            )
            after_ack = [
                seq for seq, at in acked_at.items() if any(moment > at for moment in delivered[seq])
            ]
            assert after_ack == [], f"delivered again after their ack returned: {after_ack}"
            # The subscriber moved to node 1 and kept receiving there.
            after_kill = [seq for seq, moments in delivered.items() if moments[-1] > killed_at]
            assert len(after_kill) >= TOTAL - KILL_AFTER
            assert len(set(confirmed.values())) == TOTAL  # one idem per order
            print(
                f"{len(refused)} publishes refused and sent again;"
                f" {sum(len(m) for m in delivered.values()) - len(delivered)} redeliveries"
            )
        finally:
            await publishing.close()
            await subscribing.close()
            for node in nodes:
                if node.running:
                    await node.terminate()
                await node.close()
