"""Two busy engine nodes over one replicated store: 3 NATS servers (streams
replicated 3 times), 2 engine nodes, on each node a publisher and a
subscriber of one app (the two subscribers compete), one message name.

Both nodes append to the same partition and claim from it at once, so
their compare-and-set writes keep meeting each other's pending writes;
replicated JetStream answers those with its own error codes, which the
store must take for what they are (someone wrote first) and try again.

What must hold:

* no publish fails, and no ack;
* every publish that returned its idem is delivered;
* no message is in the hands of two clients at once (each is acked by the
  client that got it before anyone else gets it), nor delivered again
  after its ack returned;
* neither node logs a failed store call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from ensync import EnSyncClient, EnSyncEngine, EnSyncError, Message
from ensync.testing.nats_server import nats_cluster
from ensync.testing.process import EngineProcess
from tests.faults.engine_process import register_shop_and_warehouse
from tests.support.timing import eventually, seconds

__all__: list[str] = []

pytestmark = [pytest.mark.slow, pytest.mark.timeout(seconds(180))]

NAME = "faults/contention/orders"
PER_PUBLISHER = 300
IN_FLIGHT = 64


async def test_two_busy_nodes_on_one_partition_fail_no_publish_and_share_no_message(
    tmp_path: Path,
) -> None:
    async with nats_cluster(tmp_path / "nats", size=3, sync="always") as servers:
        store = ",".join(server.url for server in servers) + "?replicas=3"
        shop, warehouse = await register_shop_and_warehouse(store, tmp_path)
        nodes = [
            EngineProcess(tmp_path / f"node-{i}", serve_args=["--store", store]) for i in (1, 2)
        ]
        engines: list[EnSyncEngine] = []
        try:
            await asyncio.gather(*(node.start() for node in nodes))
            engines = [EnSyncEngine(node.grpc_url, call_timeout=60_000) for node in nodes]
            confirmed: set[str] = set()
            failed: list[str] = []
            delivered: set[str] = set()
            acked: set[str] = set()
            holder: dict[str, str] = {}  # idem -> the subscriber holding it unacked
            wrong: list[str] = []  # deliveries that break the contract

            async def subscribe(label: str, engine: EnSyncEngine) -> None:
                client = await engine.create_client(
                    warehouse.app_key, app_secret_key=warehouse.secret_key
                )
                subscription = await client.subscribe(NAME, auto_ack=False)

                async def handle(message: Message) -> None:
                    idem = message.idem
                    other = holder.setdefault(idem, label)
                    if other != label:
                        wrong.append(f"{idem} held by {other}, delivered to {label}")
                    if idem in acked:
                        wrong.append(f"{idem} delivered to {label} after its ack")
                    delivered.add(idem)
                    try:
                        await subscription.ack(idem, message.block)
                    except EnSyncError as exc:
                        failed.append(f"ack of {idem} by {label}: {exc}")
                    else:
                        acked.add(idem)
                    if holder.get(idem) == label:
                        del holder[idem]

                subscription.on(handle)

            async def publish(label: str, client: EnSyncClient) -> None:
                numbers = iter(range(PER_PUBLISHER))

                async def worker() -> None:
                    for seq in numbers:
                        try:
                            idem = await client.publish(
                                NAME, [warehouse.app_id], {"by": label, "seq": seq}
                            )
                        except EnSyncError as exc:
                            failed.append(f"{label} {seq}: {exc}")
                        else:
                            confirmed.add(idem)

                await asyncio.gather(*(worker() for _ in range(IN_FLIGHT)))

            await asyncio.gather(*(subscribe(f"sub-{i}", e) for i, e in enumerate(engines, 1)))
            publishers = [await engine.create_client(shop.app_key) for engine in engines]
            started = time.monotonic()
            await asyncio.gather(*(publish(f"pub-{i}", c) for i, c in enumerate(publishers, 1)))
            published_s = time.monotonic() - started
            assert failed == [], f"{len(failed)} publishes failed, the first: {failed[:3]}"
            await eventually(lambda: confirmed <= acked, 60, "every publish delivered and acked")
            assert failed == [], f"{len(failed)} acks failed, the first: {failed[:3]}"
            assert len(confirmed) == 2 * PER_PUBLISHER
            assert wrong == [], f"{len(wrong)} deliveries broke the contract: {wrong[:3]}"
            problems = [line for node in nodes for line in node.log_problems()]
            assert problems == [], problems
            print(f"{2 * PER_PUBLISHER} publishes in {published_s:.1f} s")
        finally:
            for engine in engines:
                with contextlib.suppress(EnSyncError):
                    await engine.close()
            for node in nodes:
                await node.close()
