"""The HTTP listener: health checks."""

from __future__ import annotations

import asyncio
import json

from ensync.testing import TestServer


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = (await reader.read()).decode()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_healthz_reports_the_engine(server: TestServer) -> None:
    status, body = await http_get(server.http_port, "/healthz")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["sessions"] == 0


async def test_unknown_paths_are_not_found(server: TestServer) -> None:
    status, _ = await http_get(server.http_port, "/nope")
    assert status == 404
