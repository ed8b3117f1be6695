"""What the gRPC listener does differently for the official Go SDK (PROTOCOL.md §6, G-grpc).

Two of its habits would otherwise cost the engine:

* **A refused Subscribe comes straight back.** The Go client's Subscribe
  returns before the engine answers, and the first receive error makes it
  subscribe again with no pause, so a refusal (bad name, denial, limit)
  becomes thousands of Subscribe calls a second. The engine answers a Go
  client's refused Subscribe no sooner than ``pace_s`` after it arrived:
  about one attempt a second.
* **Close() says nothing.** It cancels its Subscribe streams and drops the
  connection, and grpcio's server has no "connection closed" event. The
  engine reads the pattern instead: when the last stream of a Go client ends
  by the client's cancel while the engine still holds that subscription (an
  Unsubscribe would have removed it first), and no call of that client
  follows within ``linger_s``, the client is gone. A Go client that really
  lost its link reconnects with a new Connect anyway (PROTOCOL.md §4).

Other clients keep today's behaviour: the official Node and Python gRPC
clients keep their client id across a channel that reconnects by itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ensync.protocol.tags import client_tag

__all__ = ["GoClientWatch"]

log = logging.getLogger(__name__)


class GoClientWatch:
    """Pacing and departure detection for Go clients, by client id.

    Args:
        gone: called with a client id once that client is judged closed.
        pace_s: the least time between a refused Subscribe and its answer.
        linger_s: how long a Go client without streams may stay silent.
    """

    def __init__(
        self, gone: Callable[[str], None], *, pace_s: float = 1.0, linger_s: float = 5.0
    ) -> None:
        self._gone = gone
        self._pace_s = pace_s
        self._linger_s = linger_s
        self._last_call: dict[str, float] = {}
        self._timers: dict[str, asyncio.TimerHandle] = {}

    async def pace_refusal(self, arrived_s: float) -> None:
        """Hold a refused Subscribe until ``pace_s`` after it arrived (monotonic)."""
        wait = arrived_s + self._pace_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def saw_call(self, client_id: str) -> None:
        """A call or a new stream of this client: it is still there."""
        self._last_call[client_id] = time.monotonic()
        timer = self._timers.pop(client_id, None)
        if timer is not None:
            timer.cancel()

    def stream_ended(self, client_id: str, *, streams_left: int, unexpected: bool) -> None:
        """A stream of this client ended; ``unexpected``: cancelled by the
        client while the engine still held its subscription."""
        if streams_left or not unexpected:
            return
        ended = time.monotonic()
        old = self._timers.pop(client_id, None)
        if old is not None:
            old.cancel()
        self._timers[client_id] = asyncio.get_running_loop().call_later(
            self._linger_s, self._check, client_id, ended
        )

    def forget(self, client_id: str) -> None:
        """The client left by other means (heartbeat failure, engine stop)."""
        self._last_call.pop(client_id, None)
        timer = self._timers.pop(client_id, None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        self._last_call.clear()

    def _check(self, client_id: str, ended: float) -> None:
        self._timers.pop(client_id, None)
        if self._last_call.get(client_id, 0.0) > ended:
            return
        self._last_call.pop(client_id, None)
        log.info(
            "client %s (grpc-go) closed: its streams ended and no call followed in %g s",
            client_tag(client_id),
            self._linger_s,
        )
        self._gone(client_id)
