"""Send one orders/status/updated message to the app whose id is ENSYNC_TO.

ENSYNC_APP_KEY=... ENSYNC_TO=... python examples/publisher.py
"""

import asyncio
import os

from ensync import EnSyncEngine


async def main() -> None:
    engine = EnSyncEngine(os.environ.get("ENSYNC_URL", "grpc://localhost:50051"))
    try:
        client = await engine.create_client(os.environ["ENSYNC_APP_KEY"])
        idem = await client.publish(
            "orders/status/updated",
            [os.environ["ENSYNC_TO"]],  # the recipient's app id
            {"orderId": "o-1", "status": "shipped"},
        )
        print("sent", idem)
    finally:
        await engine.close()


if __name__ == "__main__":
    asyncio.run(main())
