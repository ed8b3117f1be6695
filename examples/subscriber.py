"""Print every orders/status/updated message sent to this app; Ctrl-C stops.

ENSYNC_APP_KEY=... ENSYNC_SECRET_KEY=... python examples/subscriber.py
"""

import asyncio
import contextlib
import os

from ensync import EnSyncEngine


async def main() -> None:
    engine = EnSyncEngine(os.environ.get("ENSYNC_URL", "grpc://localhost:50051"))
    try:
        client = await engine.create_client(
            os.environ["ENSYNC_APP_KEY"], app_secret_key=os.environ["ENSYNC_SECRET_KEY"]
        )
        sub = await client.subscribe("orders/status/updated")
        print("waiting for messages; Ctrl-C stops", flush=True)
        async for message in sub:  # each is acked once the loop body is done
            print(f"{message.message_name} from {message.sender}: {message.payload}", flush=True)
    finally:
        await engine.close()


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
