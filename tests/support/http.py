"""A bare HTTP/1.1 GET against the engine's listeners (health, metrics)."""

from __future__ import annotations

import asyncio

__all__ = ["http_get"]


async def http_get(port: int, path: str) -> tuple[int, str]:
    """``(status, body)`` of ``GET path`` on 127.0.0.1:``port``."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    await writer.drain()
    raw = (await reader.read()).decode()
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition("\r\n\r\n")
    return int(head.split()[1]), body
