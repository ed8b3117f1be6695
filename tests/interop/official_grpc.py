"""The official PyPI gRPC client (``ensync-sdk==0.4.4``) as a test double.

The client runs in a subprocess (``drivers/p_grpc.py``): importing it here
would register its generated protobuf symbols (``ensync.ConnectRequest``, ...)
next to ours in the global descriptor pool. The driver speaks JSON lines;
this module turns them into typed values and keeps the engine serving while
the test waits (everything here is asynchronous).

Example::

    async with run_engine() as server, official_grpc_client(
        server, bob, [Subscribe("orders/created", auto_ack=False)]
    ) as official:
        ...
        result = await official.call("ack", name="orders/created", idem=idem, block=1)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensync.server.core.apps import NewApp
from ensync.testing import TestServer
from tests.support.timing import eventually, seconds

__all__ = [
    "DRIVER",
    "DriverDiedError",
    "OfficialGrpcClient",
    "Received",
    "Result",
    "Subscribe",
    "official_grpc_client",
]

# Run as a module from the project root, so it can import the shared driver loop.
DRIVER = "tests.interop.drivers.p_grpc"
ROOT = Path(__file__).resolve().parents[2]

# The driver gives each call 10 s and closes within 3 s; we wait a little longer.
CALL_TIMEOUT_S = 12.0
START_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 6.0
STDERR_KEEP = 20_000


class DriverDiedError(AssertionError):
    """The driver exited or reported a fatal error while the test needed it."""


@dataclass(frozen=True, slots=True)
class Subscribe:
    """A subscription the driver registers before connecting."""

    name: str
    auto_ack: bool = True


@dataclass(frozen=True, slots=True)
class Received:
    """A message the official client decrypted and handed to its handler."""

    name: str
    idem: str
    block: int
    payload: Any
    sender: str
    metadata: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Result:
    """The outcome of one official-client call, as the driver saw it.

    ``quirk`` names a known client bug the driver absorbed (PROTOCOL.md §6):
    ``"get_message_loop"`` when ``defer``/``discard`` raised after the engine
    had answered success.
    """

    op: str
    ok: bool
    value: Any = None
    error: str = ""
    error_type: str = ""
    quirk: str | None = None


@dataclass(eq=False)
class OfficialGrpcClient:
    """One running driver process; create it with :func:`official_grpc_client`."""

    process: asyncio.subprocess.Process
    received: list[Received] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    client_id: str = ""
    _stderr: bytearray = field(default_factory=bytearray)
    _ready: asyncio.Future[str] = field(default_factory=asyncio.Future)
    _pending: dict[int, asyncio.Future[Result]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _closed: asyncio.Event = field(default_factory=asyncio.Event)

    # ------------------------------------------------------------------ calls

    async def call(self, op: str, *, timeout_s: float = CALL_TIMEOUT_S, **fields: Any) -> Result:
        """Run one client operation in the driver and return what happened
        (the driver gives it ``timeout_s`` less two seconds)."""
        if self.process.stdin is None or self.process.returncode is not None:
            raise DriverDiedError(f"driver already exited; {self.diagnostics()}")
        ident = next(self._ids)
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[ident] = waiter
        command = {"id": ident, "op": op, "timeout_s": seconds(timeout_s - 2), **fields}
        line = json.dumps(command) + "\n"
        try:
            self.process.stdin.write(line.encode())
            await self.process.stdin.drain()
            return await asyncio.wait_for(waiter, seconds(timeout_s))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise DriverDiedError(f"driver stdin closed; {self.diagnostics()}") from exc
        except TimeoutError:
            raise DriverDiedError(f"no answer to {op!r}; {self.diagnostics()}") from None
        finally:
            self._pending.pop(ident, None)

    async def ok(self, op: str, *, timeout_s: float = CALL_TIMEOUT_S, **fields: Any) -> Result:
        """:meth:`call`, asserting that the client reported success."""
        result = await self.call(op, timeout_s=timeout_s, **fields)
        assert result.ok, f"{op} failed: {result.error_type}: {result.error}"
        return result

    async def next_message(self, count: int, timeout_s: float = 5.0) -> Received:
        """Wait until ``count`` messages were received; return the last of them."""
        await eventually(
            lambda: len(self.received) >= count or self.process.returncode is not None,
            timeout_s=timeout_s,
            what=f"message #{count} at the official client",
        )
        if len(self.received) < count:
            raise DriverDiedError(f"driver exited before message #{count}; {self.diagnostics()}")
        return self.received[count - 1]

    def diagnostics(self) -> str:
        """Fatal reports and the end of the driver's stderr, for failure messages."""
        tail = self._stderr[-2_000:].decode(errors="replace")
        return f"exit={self.process.returncode} fatal={self.fatal} stderr=...{tail}"

    # ------------------------------------------------------------------ plumbing

    async def _read_events(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            event = json.loads(raw)
            kind = event.pop("event")
            if kind == "ready":
                self.client_id = str(event["client_id"])
                if not self._ready.done():
                    self._ready.set_result(self.client_id)
            elif kind == "message":
                self.received.append(
                    Received(
                        name=event["name"],
                        idem=event["idem"],
                        block=int(event["block"]),
                        payload=event["payload"],
                        sender=event["sender"],
                        metadata=event["metadata"],
                    )
                )
            elif kind == "result":
                waiter = self._pending.get(int(event.pop("id")))
                if waiter is not None and not waiter.done():
                    waiter.set_result(Result(**event))
            elif kind == "fatal":
                self.fatal.append(f"{event.get('error_type', '')}: {event.get('error', '')}")
            elif kind == "closed":
                self._closed.set()
        # End of output: nobody will answer any more.
        died = DriverDiedError(f"driver output ended; {self.diagnostics()}")
        if not self._ready.done():
            self._ready.set_exception(died)
        for waiter in self._pending.values():
            if not waiter.done():
                waiter.set_exception(died)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.read(4096):
            self._stderr += chunk
            del self._stderr[:-STDERR_KEEP]

    async def _stop(self) -> None:
        """Ask the driver to close, then make sure it is gone."""
        process = self.process
        try:
            if process.returncode is None and process.stdin is not None:
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    process.stdin.write(b'{"id": 0, "op": "close"}\n')
                    await process.stdin.drain()
                process.stdin.close()
            await asyncio.wait_for(process.wait(), seconds(EXIT_TIMEOUT_S))
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()


@contextlib.asynccontextmanager
async def official_grpc_client(
    server: TestServer,
    app: NewApp,
    subscriptions: Sequence[Subscribe] = (),
    *,
    heartbeat_ms: int = 30_000,
    app_key: str | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[OfficialGrpcClient]:
    """Start the official client for ``app`` against ``server``, subscribed to
    ``subscriptions``; on exit close it and kill the process if it lingers.

    With ``wait_ready=False`` the block starts without waiting for the
    connection (to watch a failing connect through ``fatal``).
    """
    config = {
        "url": server.grpc_url,
        "app_key": app.app_key if app_key is None else app_key,
        "secret_key": app.secret_key,
        "subscriptions": [{"name": s.name, "auto_ack": s.auto_ack} for s in subscriptions],
        "heartbeat_ms": heartbeat_ms,
        "lifetime_s": seconds(40.0),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        DRIVER,
        json.dumps(config),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    official = OfficialGrpcClient(process)
    readers = [
        asyncio.create_task(official._read_events(), name="driver-stdout"),
        asyncio.create_task(official._read_stderr(), name="driver-stderr"),
    ]
    try:
        if wait_ready:
            try:
                await asyncio.wait_for(official._ready, seconds(START_TIMEOUT_S))
            except TimeoutError:
                raise DriverDiedError(f"driver not ready; {official.diagnostics()}") from None
        yield official
    finally:
        try:
            await official._stop()
        finally:
            # The readers end at EOF once the process is gone.
            _, lingering = await asyncio.wait(readers, timeout=seconds(EXIT_TIMEOUT_S))
            for task in lingering:
                task.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            if not official._ready.done():
                official._ready.cancel()
            elif not official._ready.cancelled():
                official._ready.exception()  # retrieved: no "never retrieved" log
