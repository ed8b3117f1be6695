"""A TCP proxy that tests and benchmarks can cut, stall and restore.

It breaks clients' links for real, where the operating system sees it.

For example:

    async with tcp_proxy(server.grpc_port) as proxy:
        engine = EnSyncEngine(f"grpc://127.0.0.1:{proxy.port}")
        ...
        await proxy.cut()       # every link dropped, new ones refused
        proxy.restore()
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

__all__ = ["TcpProxy", "tcp_proxy"]


class TcpProxy:
    """Forwards ``127.0.0.1:<port>`` to a target port on loopback.

    ``cut()`` aborts every link and refuses new ones until ``restore()``;
    ``stall()`` keeps links open but forwards nothing (a peer gone silent).
    ``refused`` counts connections turned away while cut: proof that a
    client tried.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.refused = 0
        self._server: asyncio.Server | None = None
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._open = True
        self._flowing = asyncio.Event()
        self._flowing.set()

    async def start(self) -> None:
        """Listen on a free loopback port (then in :attr:`port`)."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def cut(self, down_s: float | None = None) -> None:
        """Abort every link and refuse new connections.

        Args:
            down_s: restore after that long; ``None``: stay cut until
                :meth:`restore`.
        """
        self._open = False
        for ours, theirs in list(self._links):
            ours.transport.abort()
            theirs.transport.abort()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()  # a stalled link waits for nothing that aborting ends
        await asyncio.gather(*tasks, return_exceptions=True)
        if down_s is not None:
            await asyncio.sleep(down_s)
            self.restore()

    def restore(self) -> None:
        """Accept connections and forward bytes again."""
        self._open = True
        self._flowing.set()

    def stall(self) -> None:
        """Keep links open but forward nothing: a peer that went silent."""
        self._flowing.clear()

    async def stop(self) -> None:
        """Cut every link and stop listening."""
        await self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._open:
            self.refused += 1
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None  # a server callback always runs in a task
        self._tasks.add(task)
        try:
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
            except OSError:
                writer.transport.abort()
                return
            link = (writer, up_writer)
            self._links.add(link)
            try:
                await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
            finally:
                self._links.discard(link)
                writer.close()
                up_writer.close()
        except asyncio.CancelledError:
            # Cut: end quietly. (asyncio's stream server reads this task's
            # exception when it ends, and would log a cancellation as an error.)
            return
        finally:
            self._tasks.discard(task)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass  # the link was cut: that is the point
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def tcp_proxy(target_port: int) -> AsyncIterator[TcpProxy]:
    """A started `TcpProxy` to ``target_port``, stopped at the end."""
    proxy = TcpProxy(target_port)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
