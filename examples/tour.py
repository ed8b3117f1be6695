"""A tour of the SDK: one app sending messages to itself.

ENSYNC_APP_KEY=... ENSYNC_SECRET_KEY=... python examples/tour.py
"""

import asyncio
import os

from ensync import EnSyncEngine, Message
from ensync.crypto import decode_secret_key, keypair_from_seed


async def main() -> None:
    engine = EnSyncEngine(os.environ.get("ENSYNC_URL", "grpc://localhost:50051"))
    secret_key = os.environ["ENSYNC_SECRET_KEY"]
    # A secret key from `ensync app create` is the key pair's seed, then its
    # public half: the app id, which the tour therefore need not be given.
    me = keypair_from_seed(decode_secret_key(secret_key)[:32]).app_id
    try:
        client = await engine.create_client(os.environ["ENSYNC_APP_KEY"], app_secret_key=secret_key)

        # Handlers (plain or async) get every message; it is acked once they return.
        handled: asyncio.Queue[Message] = asyncio.Queue()
        updates = await client.subscribe("orders/status/updated")
        remove = updates.on(handled.put_nowait)
        await client.publish(
            "orders/status/updated",
            [me],
            {"orderId": "o-1", "status": "shipped"},
            {"persist": True, "headers": {"source": "shop"}},
        )
        message = await handled.get()
        print("handled", message.payload, "from", message.headers["source"])
        remove()

        # Or iterate, settling by hand: defer, then discard to the dead letters.
        tasks = await client.subscribe("orders/tasks", auto_ack=False)
        await client.publish("orders/tasks", [me], {"task": "pack o-1"})
        deferred = False
        async for message in tasks:
            if not deferred:
                await message.defer(1_000, "busy")  # delivered again in 1 s
                deferred = True
                continue
            await message.discard("cannot pack")  # settled: `break` gives nothing back
            break
        again = await tasks.replay(message.idem)  # any message of the app, settled or not
        info = again.replay_info
        print("replayed", again.payload, "acknowledged:", info and info.was_acknowledged)

        await tasks.pause("maintenance")  # no deliveries until resumed
        await tasks.resume()
        await tasks.unsubscribe()
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
