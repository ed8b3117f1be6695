"""The engine as a real ``ensync serve`` process that a test can SIGKILL and start again.

Every incarnation serves the same data directory on the same two ports, so
clients find the restarted engine where the killed one was. Each
incarnation's output goes to its own log file (never to a pipe nobody reads,
which would stall the engine once full).
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.support.timing import seconds

__all__ = ["AppKeys", "EngineProcess", "create_app", "free_port", "integrity_check"]


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, slots=True)
class AppKeys:
    """What ``ensync app create --json`` prints."""

    name: str
    app_key: str
    app_id: str
    secret_key: str


async def create_app(data: Path, name: str) -> AppKeys:
    """Register an app in ``data`` with the real command line."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ensync.cli.main",
        "app",
        "create",
        name,
        "--data",
        str(data),
        "--json",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), seconds(60))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, f"ensync app create {name} failed: {err.decode()}"
    fields = json.loads(out)
    return AppKeys(fields["name"], fields["app_key"], fields["app_id"], fields["secret_key"])


def integrity_check(db: Path) -> list[str]:
    """``PRAGMA integrity_check`` on ``db``, opened read-only: ``["ok"]`` when sound."""
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=seconds(10))
    try:
        return [str(row[0]) for row in connection.execute("PRAGMA integrity_check")]
    finally:
        connection.close()


class EngineProcess:
    """``ensync serve`` on fixed loopback ports over one data directory.

    Call :meth:`start` for each incarnation, :meth:`kill` (SIGKILL) or
    :meth:`terminate` (SIGTERM) to end it, and :meth:`close` in ``finally``.

    Args:
        data: the data directory (the sqlite store is ``data/ensync.db``).
        logs: where each incarnation's output goes (``engine-<n>.log``).
        serve_args: extra ``ensync serve`` flags, e.g. ``["--ack-deadline-ms", "1000"]``.
    """

    def __init__(self, data: Path, logs: Path, serve_args: list[str]) -> None:
        self.data = data
        self.logs = logs
        self.grpc_port = free_port()
        self.http_port = free_port()
        self._serve_args = serve_args
        self._process: asyncio.subprocess.Process | None = None
        self.incarnations = 0

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.http_port}"

    @property
    def db(self) -> Path:
        return self.data / "ensync.db"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.returncode is None

    def log_path(self, incarnation: int) -> Path:
        return self.logs / f"engine-{incarnation}.log"

    async def start(self) -> None:
        """Start the next incarnation and wait until both listeners accept."""
        assert not self.running, "the engine is already running"
        self.incarnations += 1
        self.logs.mkdir(parents=True, exist_ok=True)
        with self.log_path(self.incarnations).open("wb") as log:
            self._process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ensync.cli.main",
                "serve",
                "--data",
                str(self.data),
                "--grpc",
                f"127.0.0.1:{self.grpc_port}",
                "--http",
                f"127.0.0.1:{self.http_port}",
                *self._serve_args,
                stdout=log,
                stderr=log,
            )
        for port in (self.grpc_port, self.http_port):
            await self._wait_listening(port)

    async def _wait_listening(self, port: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds(30)
        while True:
            if not self.running:
                raise AssertionError(
                    f"engine incarnation {self.incarnations} exited before listening on "
                    f"{port}:\n{self.log_text(self.incarnations)}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if loop.time() > deadline:
                    raise AssertionError(f"nothing listens on {port}") from None
                await asyncio.sleep(0.02)
                continue
            writer.close()
            await writer.wait_closed()
            return

    async def kill(self) -> None:
        """SIGKILL the running incarnation and reap it."""
        process = self._process
        assert process is not None, "the engine was never started"
        assert process.returncode is None, "the engine is not running"
        process.send_signal(signal.SIGKILL)
        await asyncio.wait_for(process.wait(), seconds(30))

    async def terminate(self) -> int:
        """SIGTERM the running incarnation; returns its exit code."""
        process = self._process
        assert process is not None, "the engine was never started"
        assert process.returncode is None, "the engine is not running"
        process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(process.wait(), seconds(30))

    async def close(self) -> None:
        """Kill the engine if it still runs (for ``finally``)."""
        process = self._process
        if process is not None and process.returncode is None:
            process.kill()
            await process.wait()

    def log_text(self, incarnation: int) -> str:
        path = self.log_path(incarnation)
        return path.read_text(errors="replace") if path.exists() else ""

    def all_logs(self) -> str:
        return "".join(
            f"--- engine incarnation {n} ---\n{self.log_text(n)}"
            for n in range(1, self.incarnations + 1)
        )
