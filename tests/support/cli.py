"""The ``ensync`` command line as a test runs it: one-shot commands and a
serving engine in a child process (which dies with the test process)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from ensync.testing.process import dies_with_parent
from tests.support.timing import seconds

__all__ = ["Serving", "ensync", "free_port", "serve", "start_serve", "wait_listening"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ensync(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ensync.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=seconds(60),
        env={**os.environ, **(env or {})},
        check=False,
    )


async def wait_listening(port: int, process: asyncio.subprocess.Process) -> None:
    for _ in range(int(seconds(300))):
        assert process.returncode is None, "the engine exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        await writer.wait_closed()
        return
    raise AssertionError(f"nothing listens on {port}")


class Serving:
    def __init__(self, process: asyncio.subprocess.Process, data: Path, grpc_port: int) -> None:
        self.process = process
        self.data = data
        self.grpc_port = grpc_port

    @property
    def url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"


async def start_serve(
    data: Path, grpc_port: int, http_port: int, *options: str
) -> asyncio.subprocess.Process:
    """``ensync serve`` over ``data`` on the given loopback ports, listening."""
    process = await asyncio.create_subprocess_exec(
        *dies_with_parent(
            [
                sys.executable,
                *("-m", "ensync.cli.main", "serve", "--data", str(data)),
                *("--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{http_port}"),
                *options,
            ]
        ),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_listening(grpc_port, process)
        await wait_listening(http_port, process)
    except BaseException:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise
    return process


@contextlib.asynccontextmanager
async def serve(tmp_path: Path) -> AsyncIterator[Serving]:
    """``ensync serve`` on free loopback ports over ``tmp_path/data``."""
    grpc_port, http_port = free_port(), free_port()
    data = tmp_path / "data"
    process = await start_serve(data, grpc_port, http_port)
    try:
        yield Serving(process, data, grpc_port)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
