"""Engine CPU per message for the official PyPI gRPC client (a program, not a test).

One official client (``ensync-sdk``, driven in its own process by
``drivers/p_grpc.py``) publishes bursts of 256 concurrent 1 KB messages to
an engine served in this process (sqlite store); the CPU this process spent
per message is the engine's cost of an official, unary publish. Run from the
project root in a development checkout::

    .venv/bin/python -m tests.interop.measure_official_cpu [ROUNDS]

It prints one line per trial and the median of three.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import time

from ensync.testing import run_engine
from tests.interop.official_grpc import official_grpc_client

BURST = 256
NAME = "bench/official"
PAYLOAD = {"data": "x" * 1000}


async def measure(rounds: int) -> None:
    async with run_engine("sqlite:", rate_limit_per_app=0) as server:
        alice = await server.create_app("alice")
        bob = await server.create_app("bob")
        async with official_grpc_client(server, alice) as official:

            async def burst() -> int:
                result = await official.call(
                    "publish_burst",
                    name=NAME,
                    recipients=[bob.app_id],
                    payload=PAYLOAD,
                    count=BURST,
                )
                if result.value["failed"]:
                    raise SystemExit(f"publishes failed: {result.value}")
                return int(result.value["answered"])

            await burst()  # warm-up
            figures: list[float] = []
            for trial in range(3):
                cpu, wall = time.process_time(), time.perf_counter()
                answered = sum([await burst() for _ in range(rounds)])
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                figures.append(cpu / answered * 1e6)
                print(
                    f"trial {trial + 1}: {answered} answered, engine {figures[-1]:.0f} µs CPU"
                    f" per message, {answered / wall:,.0f} msg/s",
                    flush=True,
                )
            print(f"median: {statistics.median(figures):.0f} µs of engine CPU per official publish")


if __name__ == "__main__":
    asyncio.run(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 16))
