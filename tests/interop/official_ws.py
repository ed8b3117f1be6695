"""The official WebSocket clients as test doubles.

Two clients, each in a subprocess driver that speaks the same JSON-line
protocol (see ``drivers/p_ws.py``):

* :data:`P_WS` - PyPI ``ensync-sdk-ws==0.4.3``, ``drivers/p_ws.py``, run with
  this interpreter (never imported here: one client per process keeps its
  tasks, loggers and globals away from the test);
* :data:`N_WS_0018` - npm ``ensync-client-sdk@0.0.18`` (``websocket.js``),
  ``drivers/n_ws_0018.js``, run with ``node``; the package comes from
  ``tests/node/node_modules`` (``make node`` / ``npm ci`` there).

Both are handed the engine's **http** base URL; the clients append
``/message`` and switch the scheme themselves (PROTOCOL.md §3.1).

Example::

    async with run_engine() as server, official_ws_client(
        P_WS, server, bob, [WsSubscribe("orders/created")]
    ) as official:
        message = await official.next_message(1)
        await official.ok("ack", name="orders/created", idem=message.idem, block=message.raw_block)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ensync.server.core.apps import NewApp
from ensync.testing import TestServer
from tests.interop.official_grpc import DriverDiedError, Result
from tests.support.timing import eventually, seconds

__all__ = [
    "NODE_PROJECT",
    "N_WS_0018",
    "P_WS",
    "DriverDiedError",
    "OfficialWsClient",
    "Received",
    "Result",
    "WsClientKind",
    "WsSubscribe",
    "http_base_url",
    "official_ws_client",
    "publish_idems",
]

DRIVERS = Path(__file__).parent / "drivers"
NODE_PROJECT = Path(__file__).parent.parent / "node"

# The drivers give each call 10 s and close within 3 s; we wait a little longer.
CALL_TIMEOUT_S = 12.0
START_TIMEOUT_S = 15.0
EXIT_TIMEOUT_S = 6.0
LIFETIME_S = 40.0
STDERR_KEEP = 20_000


@dataclass(frozen=True, slots=True)
class WsClientKind:
    """Which official client a driver runs, and how to start it."""

    name: str
    driver: Path | str  # a script for Node, a module (run with -m) for Python
    interpreter: str  # an executable name looked up on PATH, or an absolute path

    def command(self) -> list[str]:
        executable = shutil.which(self.interpreter)
        if executable is None:
            # Fail, never skip: a missing runtime must not pass unnoticed.
            raise AssertionError(f"{self.interpreter!r} is not installed; {self.name} needs it")
        if isinstance(self.driver, str):
            return [executable, "-m", self.driver]
        return [executable, str(self.driver)]


P_WS = WsClientKind("ensync-sdk-ws 0.4.3 (P-ws)", "tests.interop.drivers.p_ws", sys.executable)
# Python drivers import the shared driver loop: they run from the project root.
ROOT = Path(__file__).resolve().parents[2]
N_WS_0018 = WsClientKind("ensync-client-sdk 0.0.18 (N-ws-0018)", DRIVERS / "n_ws_0018.js", "node")


@dataclass(frozen=True, slots=True)
class WsSubscribe:
    """A subscription the driver opens right after connecting.

    ``auto_ack`` is honoured by the Node driver only: P-ws would deadlock on
    its own auto-ack (PROTOCOL.md §6), so its driver always acks on command.
    """

    name: str
    auto_ack: bool = False


@dataclass(frozen=True, slots=True)
class Received:
    """A message the official client decrypted and handed to its handler.

    ``raw_block`` is the block exactly as the client holds it (send it back in
    ``ack``); ``sender`` is ``None`` for N-ws-0018, which does not expose it.
    """

    name: str
    idem: str
    block: int
    raw_block: str | int
    payload: Any
    sender: str | None
    metadata: Any
    timestamp: Any


def http_base_url(server: TestServer) -> str:
    """The URL an official WebSocket client is given for ``server``."""
    return f"http://127.0.0.1:{server.http_port}"


def publish_idems(value: Any) -> list[str]:
    """The idems in what an official client's ``publish()`` returned.

    Both clients return the raw replies, ``+PASS:<idem>``, joined by ``,``.
    """
    assert isinstance(value, str), f"publish returned {value!r}"
    parts = value.split(",")
    assert all(part.startswith("+PASS:") for part in parts), f"publish returned {value!r}"
    return [part.removeprefix("+PASS:") for part in parts]


@dataclass(eq=False)
class OfficialWsClient:
    """One running driver process; create it with :func:`official_ws_client`."""

    kind: WsClientKind
    process: asyncio.subprocess.Process
    received: list[Received] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)
    client_id: str | None = None
    _stderr: bytearray = field(default_factory=bytearray)
    _noise: list[str] = field(default_factory=list)
    _ready: asyncio.Future[str | None] = field(default_factory=asyncio.Future)
    _pending: dict[int, asyncio.Future[Result]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    # ------------------------------------------------------------------ calls

    async def call(self, op: str, **fields: Any) -> Result:
        """Run one client operation in the driver and return what happened."""
        if self.process.stdin is None or self.process.returncode is not None:
            raise DriverDiedError(f"driver already exited; {self.diagnostics()}")
        ident = next(self._ids)
        waiter: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._pending[ident] = waiter
        line = json.dumps({"id": ident, "op": op, **fields}) + "\n"
        try:
            self.process.stdin.write(line.encode())
            await self.process.stdin.drain()
            return await asyncio.wait_for(waiter, seconds(CALL_TIMEOUT_S))
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise DriverDiedError(f"driver stdin closed; {self.diagnostics()}") from exc
        except TimeoutError:
            raise DriverDiedError(f"no answer to {op!r}; {self.diagnostics()}") from None
        finally:
            self._pending.pop(ident, None)

    async def ok(self, op: str, **fields: Any) -> Result:
        """:meth:`call`, asserting that the client reported success."""
        result = await self.call(op, **fields)
        assert result.ok, f"{self.kind.name}: {op} failed: {result.error_type}: {result.error}"
        return result

    async def publish(
        self,
        name: str,
        recipients: Sequence[str],
        payload: Any,
        metadata: dict[str, Any] | None = None,
    ) -> list[str]:
        """Publish through the official client; returns the idems it was given."""
        fields: dict[str, Any] = {"name": name, "recipients": list(recipients), "payload": payload}
        if metadata is not None:
            fields["metadata"] = metadata
        return publish_idems((await self.ok("publish", **fields)).value)

    async def next_message(self, count: int, timeout_s: float = 5.0) -> Received:
        """Wait until ``count`` messages were received; return the last of them."""
        await eventually(
            lambda: len(self.received) >= count or self.process.returncode is not None,
            timeout_s=timeout_s,
            what=f"message #{count} at {self.kind.name}",
        )
        if len(self.received) < count:
            raise DriverDiedError(f"driver exited before message #{count}; {self.diagnostics()}")
        return self.received[count - 1]

    def diagnostics(self) -> str:
        """Fatal reports and the end of the driver's output, for failure messages."""
        tail = self._stderr[-2_000:].decode(errors="replace")
        return (
            f"{self.kind.name} exit={self.process.returncode} fatal={self.fatal} "
            f"stdout-noise={self._noise[-5:]} stderr=...{tail}"
        )

    # ------------------------------------------------------------------ plumbing

    def _on_event(self, event: dict[str, Any]) -> None:
        kind = event.pop("event")
        if kind == "ready":
            client_id = event.get("client_id")
            self.client_id = None if client_id is None else str(client_id)
            if not self._ready.done():
                self._ready.set_result(self.client_id)
        elif kind == "message":
            self.received.append(
                Received(
                    name=str(event["name"]),
                    idem=str(event["idem"]),
                    block=int(event["block"]),
                    raw_block=event["block"],
                    payload=event["payload"],
                    sender=event.get("sender"),
                    metadata=event.get("metadata"),
                    timestamp=event.get("timestamp"),
                )
            )
        elif kind == "result":
            waiter = self._pending.get(int(event.pop("id")))
            if waiter is not None and not waiter.done():
                waiter.set_result(Result(**event))
        elif kind == "fatal":
            self.fatal.append(f"{event.get('error_type', '')}: {event.get('error', '')}")

    async def _read_events(self) -> None:
        assert self.process.stdout is not None
        async for raw in self.process.stdout:
            try:
                event = json.loads(raw)
            except json.JSONDecodeError:
                # Stray output (a client printing to stdout): keep it for diagnostics.
                self._noise.append(raw.decode(errors="replace").rstrip())
                continue
            if isinstance(event, dict) and "event" in event:
                self._on_event(event)
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
async def official_ws_client(
    kind: WsClientKind,
    server: TestServer,
    app: NewApp,
    subscriptions: Sequence[WsSubscribe] = (),
    *,
    app_key: str | None = None,
    wait_ready: bool = True,
) -> AsyncIterator[OfficialWsClient]:
    """Start the official ``kind`` client for ``app`` against ``server``,
    subscribed to ``subscriptions``; on exit close it and kill the process if
    it lingers.

    With ``wait_ready=False`` the block starts without waiting for the
    connection (to watch a failing connect through ``fatal``).
    """
    config = {
        "url": http_base_url(server),
        "app_key": app.app_key if app_key is None else app_key,
        "secret_key": app.secret_key,
        "subscriptions": [{"name": s.name, "auto_ack": s.auto_ack} for s in subscriptions],
        "lifetime_s": seconds(LIFETIME_S),
    }
    process = await asyncio.create_subprocess_exec(
        *kind.command(),
        json.dumps(config),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    official = OfficialWsClient(kind, process)
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
