"""Drive the official PyPI WebSocket client ``ensync-sdk-ws==0.4.3`` (P-ws) from a test.

Run as a script, never imported into the test process (the harness in
``tests/interop/official_ws.py`` starts it)::

    python -m tests.interop.drivers.p_ws '<config JSON>'   # from the project root

The config (see :class:`Config`) gives the engine's http(s) base URL (the
client maps it to ``ws://…/message`` itself, PROTOCOL.md §3.1), the app's key
and secret, and the names to subscribe to. The driver then reads one JSON
command per line on stdin and writes one JSON event per line on stdout:

* ``{"event": "ready", "client_id": ...}`` once connected and subscribed;
* ``{"event": "message", "name": ..., "idem": ..., ...}`` per handled message;
* ``{"event": "result", "id": n, "ok": ..., ...}`` per command;
* ``{"event": "fatal", "error": ...}`` when it gives up;
* ``{"event": "closed"}`` just before it exits.

Commands: ``{"id": n, "op": OP, ...}`` with OP one of ``publish`` (name,
recipients, payload, metadata), ``ack`` (name, idem, block), ``defer`` (name,
idem, delay_ms, reason), ``discard`` (name, idem, reason), ``replay`` (name,
idem), ``pause`` (name, reason), ``continue`` (name), ``unsubscribe`` (name),
``close``. The driver
exits after ``close``, at end of input, or when its lifetime runs out.

Quirks of the official client worked around here (PROTOCOL.md §6, P-ws):

* ``subscribe()`` and ``@handler`` only register locally and never send SUB;
  the driver calls the private ``_ensure_subscription()``, which does;
* handlers registered before ``create_client()`` are lost (its re-subscribe
  awaits a non-awaitable), so the driver registers them after connecting and
  before SUB, so that no record can arrive without a handler;
* handlers run on the only socket-reader task, so an awaited request inside
  one - the default auto-ack included - deadlocks until the 30 s timeout:
  every subscription uses ``auto_ack=False``, the handler only reports, and
  the test acks with a separate command;
* ``defer()`` and ``discard()`` raise (``asyncio.get_message_loop`` does not
  exist) after the engine answered ``+PASS``; that error is reported as
  success with ``"quirk": "get_message_loop"``;
* the decorator object's ``replay()`` calls a method that does not exist; the
  driver replays through the inner subscription object, which works;
* ``publish()`` returns the raw ``+PASS:…`` replies joined by ``,``; the
  driver hands them over unchanged and the test reads the idems out of them;
* messages whose decrypted payload is falsy (``{}``) never reach a handler:
  tests must not send them to this client.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from tests.interop.drivers.pyclient import (
    CALL_TIMEOUT_S,
    CLOSE_TIMEOUT_S,
    cancel_leftovers,
    describe,
    emit,
    run,
)

QUIRK_LOOP = "get_message_loop"


@dataclass(frozen=True, slots=True)
class Config:
    url: str
    app_key: str
    secret_key: str
    subscriptions: tuple[str, ...]
    lifetime_s: float = 30.0

    @classmethod
    def parse(cls, text: str) -> Config:
        raw = json.loads(text)
        return cls(
            url=str(raw["url"]),
            app_key=str(raw["app_key"]),
            secret_key=str(raw["secret_key"]),
            subscriptions=tuple(str(item["name"]) for item in raw.get("subscriptions", ())),
            lifetime_s=float(raw.get("lifetime_s", 30.0)),
        )


class Driver:
    def __init__(self, config: Config, sdk: Any) -> None:
        self.config = config
        self.client: Any = sdk.EnSyncEngine(config.url)
        self.subs: dict[str, Any] = {}

    async def start(self) -> None:
        await asyncio.wait_for(
            self.client.create_client(
                self.config.app_key, {"appSecretKey": self.config.secret_key}
            ),
            CALL_TIMEOUT_S,
        )
        for name in self.config.subscriptions:
            sub = self.client.subscribe(name, auto_ack=False)
            sub.handler(self._handler)  # local only: no SUB goes out
            await asyncio.wait_for(sub._ensure_subscription(), CALL_TIMEOUT_S)  # sends SUB
            self.subs[name] = sub
        # Name-mangled private config: the only place the client keeps its id.
        client_id = self.client._EnSyncEngine__config.get("clientId")
        emit("ready", client_id=client_id)

    async def _handler(self, message: dict[str, Any]) -> None:
        # Runs on the socket-reader task: report only, never await a request.
        emit(
            "message",
            name=message.get("messageName"),
            idem=message.get("idem"),
            block=message.get("block"),
            payload=message.get("payload"),
            sender=message.get("sender"),
            metadata=message.get("metadata"),
            timestamp=message.get("timestamp"),
        )

    async def run(self, command: dict[str, Any]) -> None:
        op = command.get("op")
        ident = command.get("id")
        try:
            value = await asyncio.wait_for(self._call(command), CALL_TIMEOUT_S)
        except TimeoutError:
            emit("result", id=ident, op=op, ok=False, error="timed out", error_type="Timeout")
        # Isolation boundary: the official client raises whatever it raises;
        # every error goes to the test as a result, which decides.
        except Exception as error:  # noqa: BLE001
            if op in ("defer", "discard") and QUIRK_LOOP in str(error):
                # Raised only after the engine answered +PASS.
                emit("result", id=ident, op=op, ok=True, value=None, quirk=QUIRK_LOOP)
            else:
                emit("result", id=ident, op=op, ok=False, **describe(error))
        else:
            emit("result", id=ident, op=op, ok=True, value=value)

    async def _call(self, command: dict[str, Any]) -> Any:
        sub = self.subs.get(command.get("name", ""))
        reason = str(command.get("reason", ""))
        call: Awaitable[Any]
        match command["op"]:
            case "publish":
                call = self.client.publish(
                    command["name"],
                    list(command["recipients"]),
                    command["payload"],
                    command.get("metadata"),
                )
            case "ack" if sub is not None:
                call = sub.ack(command["idem"], command["block"])
            case "defer" if sub is not None:
                call = sub.defer(command["idem"], int(command["delay_ms"]), reason)
            case "discard" if sub is not None:
                call = sub.discard(command["idem"], reason)
            case "replay" if sub is not None:
                # The decorator's replay() is broken; the inner subscription's works.
                inner = await sub._ensure_subscription()
                call = inner.replay(command["idem"])
            case "pause" if sub is not None:
                call = sub.pause(reason)
            case "continue" if sub is not None:
                call = sub.resume()
            case "unsubscribe" if sub is not None:
                call = sub.unsubscribe()
            case op:
                raise ValueError(f"unknown op {op!r} or name not subscribed: {command}")
        return await call

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.close(), CLOSE_TIMEOUT_S)
        # Isolation boundary: the official client's close may fail any way;
        # that must not stop the driver from exiting (the test sees the report).
        except Exception as error:  # noqa: BLE001
            emit("close_error", **describe(error))
        # close() cancels its reader and ping tasks but not the 30 s timeout
        # task of a request still waiting for its reply.
        await cancel_leftovers()


if __name__ == "__main__":
    config = Config.parse(sys.argv[1])
    sys.exit(asyncio.run(run("ensync_sdk_ws", lambda sdk: Driver(config, sdk), config.lifetime_s)))
