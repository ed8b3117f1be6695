"""Drive the official PyPI client ``ensync-sdk==0.4.4`` (P-grpc) from a test.

Run as a script, never imported into the test process (its generated
``ensync_pb2`` registers the same protobuf symbols as ours)::

    python -m tests.interop.drivers.p_grpc '<config JSON>'   # from the project root

The config (see :class:`Config`) names the engine, the app's key and secret,
and the subscriptions to open. The driver then reads one JSON command per
line on stdin and writes one JSON event per line on stdout:

* ``{"event": "ready", "client_id": ...}`` once connected and subscribed;
* ``{"event": "message", "name": ..., "idem": ..., ...}`` per handled message;
* ``{"event": "result", "id": n, "ok": ..., ...}`` per command;
* ``{"event": "fatal", "error": ...}`` when it gives up;
* ``{"event": "closed"}`` just before it exits.

Commands: ``{"id": n, "op": OP, ...}`` with OP one of ``publish`` (name,
recipients, payload, metadata), ``publish_burst`` (name, recipients, payload,
count: that many publishes at once), ``ack`` (name, idem, block), ``defer`` (name,
idem, delay_ms, reason), ``discard`` (name, idem, reason), ``replay`` (name,
idem), ``pause`` (name, reason), ``continue`` (name), ``close``. The driver
exits after ``close``, at end of input, or when its lifetime runs out.

Quirks of the official client worked around here (PROTOCOL.md §6, P-grpc):

* handlers only work when registered through the decorator object *before*
  ``create_client()``, so the config lists every subscription up front;
* the decorator object's methods open a second Subscribe stream for the same
  name on first use; the driver opens it right after connecting, so that it
  exists before any message flows instead of appearing mid-test;
* ``defer()`` and ``discard()`` raise (``asyncio.get_message_loop`` does not
  exist) after the engine answered success; that error is reported as success
  with ``"quirk": "get_message_loop"``;
* ``close`` is defined three times (the last wins) and leaves the first stream
  task of each name running; the driver closes with a timeout and then
  cancels whatever the client left behind;
* the heartbeat task starts before Connect and runs until ``close()``; the
  driver always closes, even when ``create_client()`` failed.
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
class Subscribe:
    name: str
    auto_ack: bool


@dataclass(frozen=True, slots=True)
class Config:
    url: str
    app_key: str
    secret_key: str
    subscriptions: tuple[Subscribe, ...]
    heartbeat_ms: int = 30_000
    lifetime_s: float = 30.0

    @classmethod
    def parse(cls, text: str) -> Config:
        raw = json.loads(text)
        return cls(
            url=str(raw["url"]),
            app_key=str(raw["app_key"]),
            secret_key=str(raw["secret_key"]),
            subscriptions=tuple(
                Subscribe(str(item["name"]), bool(item.get("auto_ack", True)))
                for item in raw.get("subscriptions", ())
            ),
            heartbeat_ms=int(raw.get("heartbeat_ms", 30_000)),
            lifetime_s=float(raw.get("lifetime_s", 30.0)),
        )


class Driver:
    def __init__(self, config: Config, sdk: Any) -> None:
        self.config = config
        self.client: Any = sdk.EnSyncEngine(config.url, {"heartbeatInterval": config.heartbeat_ms})
        self.subs: dict[str, Any] = {}

    async def start(self) -> None:
        for wanted in self.config.subscriptions:
            # Decorator API: register before create_client or never be called.
            sub = self.client.subscribe(wanted.name, auto_ack=wanted.auto_ack)
            sub.handler(self._handler)
            self.subs[wanted.name] = sub
        await asyncio.wait_for(
            self.client.create_client(
                self.config.app_key, {"appSecretKey": self.config.secret_key}
            ),
            CALL_TIMEOUT_S,
        )
        for sub in self.subs.values():
            # Opens the decorator's second stream now (it would on first use).
            await asyncio.wait_for(sub._ensure_subscription(), CALL_TIMEOUT_S)
        emit("ready", client_id=self.client.client_id)

    async def _handler(self, message: dict[str, Any]) -> None:
        emit(
            "message",
            name=message.get("messageName"),
            idem=message.get("idem"),
            block=message.get("block"),
            payload=message.get("payload"),
            sender=message.get("sender"),
            metadata=message.get("metadata"),
        )

    async def run(self, command: dict[str, Any]) -> None:
        op = command.get("op")
        ident = command.get("id")
        try:
            timeout_s = float(command.get("timeout_s", CALL_TIMEOUT_S))
            value = await asyncio.wait_for(self._call(command), timeout_s)
        except TimeoutError:
            emit("result", id=ident, op=op, ok=False, error="timed out", error_type="Timeout")
        # Isolation boundary: the official client raises whatever it raises;
        # every error goes to the test as a result, which decides.
        except Exception as error:  # noqa: BLE001
            if op in ("defer", "discard") and QUIRK_LOOP in str(error):
                # Raised only after the engine answered success=true.
                emit("result", id=ident, op=op, ok=True, value=None, quirk=QUIRK_LOOP)
            else:
                emit("result", id=ident, op=op, ok=False, **describe(error))
        else:
            emit("result", id=ident, op=op, ok=True, value=value)

    def _call(self, command: dict[str, Any]) -> Awaitable[Any]:
        # Subscription calls go through the decorator object, as users write them.
        sub = self.subs.get(command.get("name", ""))
        reason = str(command.get("reason", ""))
        match command["op"]:
            case "publish_burst":
                call = self._burst(command)
            case "publish":
                call = self.client.publish(
                    command["name"],
                    list(command["recipients"]),
                    command["payload"],
                    command.get("metadata"),
                )
            case "ack" if sub is not None:
                call = sub.ack(command["idem"], int(command["block"]))
            case "defer" if sub is not None:
                call = sub.defer(command["idem"], int(command["delay_ms"]), reason)
            case "discard" if sub is not None:
                call = sub.discard(command["idem"], reason)
            case "replay" if sub is not None:
                call = sub.replay(command["idem"])
            case "pause" if sub is not None:
                call = sub.pause(reason)
            case "continue" if sub is not None:
                call = sub.resume()
            case op:
                raise ValueError(f"unknown op {op!r} or name not subscribed: {command}")
        return call

    async def _burst(self, command: dict[str, Any]) -> dict[str, Any]:
        """``count`` publishes at once on the client's one connection, as a
        user's ``asyncio.gather`` makes them; how many were answered."""
        results = await asyncio.gather(
            *(
                self.client.publish(
                    command["name"], list(command["recipients"]), {**command["payload"], "n": n}
                )
                for n in range(int(command["count"]))
            ),
            return_exceptions=True,
        )
        failures = [r for r in results if isinstance(r, BaseException)]
        return {
            "answered": len(results) - len(failures),
            "failed": len(failures),
            "errors": sorted({describe(f)["error"][:200] for f in failures})[:3],
        }

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.client.close(), CLOSE_TIMEOUT_S)
        # Isolation boundary: the official client's close may fail any way;
        # that must not stop the driver from exiting (the test sees the report).
        except Exception as error:  # noqa: BLE001
            emit("close_error", **describe(error))
        # close() cancels only the tasks it still tracks; the first stream task
        # of each name (replaced by the decorator's second one) is orphaned.
        await cancel_leftovers()


if __name__ == "__main__":
    config = Config.parse(sys.argv[1])
    sys.exit(asyncio.run(run("ensync_sdk", lambda sdk: Driver(config, sdk), config.lifetime_s)))
