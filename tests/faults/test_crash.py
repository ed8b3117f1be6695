"""Crash safety: the engine SIGKILLed mid-stream, again and again.

A real ``ensync serve`` process (sqlite store) serves publishers and
subscribers of our SDK over both transports while the test kills it with
SIGKILL at random moments and starts it again on the same data directory and
ports. The delivery contract (DESIGN.md §2) must hold across every crash:

* a publish that returned its idem was stored durably: some subscriber
  receives it, after however many crashes;
* an ack that returned was stored durably: no later incarnation of the
  engine delivers that message again;
* the database file stays sound (``PRAGMA integrity_check``), right after
  each crash and after the final clean shutdown;
* every client heals by itself: after each restart, every publisher
  publishes and every subscriber receives again.

The kill moments come from a seeded random generator; the seed is printed
and attached to any failure. ``ENSYNC_FAULT_SEED=<seed>`` replays the same
schedule (the interleaving of the clients still varies).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from ensync import EnSyncClient, EnSyncConnectionError, EnSyncError, EnSyncTimeoutError, Message
from ensync import EnSyncEngine as GrpcEngine
from ensync.client.engine import BaseEngine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.faults.engine_process import AppKeys, EngineProcess, create_app, integrity_check
from tests.faults.ledger import Ledger
from tests.support.timing import eventually

KILLS = 3
NAMES = ("faults/crash/a", "faults/crash/b")
SEED_ENV = "ENSYNC_FAULT_SEED"
ACK_DEADLINE_MS = 1000
# Reconnect quickly and never give up; calls fail fast rather than hang.
# Heartbeats keep their default: detecting a restart must not depend on them.
SDK_OPTIONS: dict[str, Any] = {
    "reconnect_interval": 50,
    "max_reconnect_attempts": 10_000,
    "call_timeout": 5_000,
}
# Publish and ack errors that only mean "the engine is down right now".
LINK_ERRORS = {EnSyncConnectionError.__name__, EnSyncTimeoutError.__name__}
# Each publisher keeps PIPELINE publishes going, each followed by a pause:
# a steady stream (a few hundred messages a second in all) that a loaded
# two-core machine still drains quickly at the end.
PIPELINE = 2
PAUSE_S = 0.025
# Successes each client needs in an epoch before the next kill, so the kill
# lands mid-stream with every client back at work.
MIN_PUBLISHES = 5
MIN_DELIVERIES = 3
# How long clients get to heal after a restart (scaled by seconds()).
HEAL_S = 10.0


def being_cancelled() -> bool:
    """Whether someone cancelled the current task.

    A CancelledError while nobody cancelled us came out of an SDK call on
    its own: a bug, which the test records and reports instead of dying of it.
    """
    task = asyncio.current_task()
    return task is None or task.cancelling() > 0


@dataclass
class Publisher:
    """One client publishing ``{"publisher", "seq"}`` payloads until stopped."""

    label: str
    client: EnSyncClient
    recipients: list[str]
    ledger: Ledger
    _seq: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        await asyncio.gather(*(self._publish(stop) for _ in range(PIPELINE)))

    async def _publish(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._seq += 1
            seq = self._seq
            payload = {"publisher": self.label, "seq": seq}
            self.ledger.attempt(self.label, seq, payload)
            try:
                joined = await self.client.publish(
                    NAMES[seq % len(NAMES)], self.recipients, payload, {"persist": True}
                )
            except EnSyncError as exc:
                # Not a success, so nothing is promised about it. Keep going:
                # the client reconnects by itself.
                self.ledger.failed("publish", exc)
            except asyncio.CancelledError as exc:
                if being_cancelled():
                    raise
                self.ledger.failed("publish", exc)  # leaked by the SDK: a bug, reported
            else:
                self.ledger.published_ok(self.label, self.recipients, payload, joined)
            await asyncio.sleep(PAUSE_S)


@dataclass
class Subscriber:
    """One client of a recipient app, subscribed to every name, acking by hand."""

    label: str
    client: EnSyncClient
    app: AppKeys
    sender: AppKeys
    ledger: Ledger
    _acks: set[asyncio.Task[None]] = field(default_factory=set)
    # Not the test's seeded generator: that one draws the kill schedule only.
    _jitter: random.Random = field(default_factory=random.Random)

    async def start(self) -> None:
        for name in NAMES:
            subscription = await self.client.subscribe(name, auto_ack=False)
            subscription.on(partial(self._on_message, subscription.ack))

    def _on_message(self, ack: Callable[[str, int], Awaitable[None]], message: Message) -> None:
        self.ledger.delivered(self.label, self.app.app_id, self.sender.app_id, message)
        # Acked a little later, so a crash finds messages delivered, not yet acked.
        task = asyncio.get_running_loop().create_task(
            self._ack(ack, message, self._jitter.uniform(0, 0.03))
        )
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _ack(
        self, ack: Callable[[str, int], Awaitable[None]], message: Message, delay_s: float
    ) -> None:
        await asyncio.sleep(delay_s)
        try:
            await ack(message.idem, message.block)
        except EnSyncError as exc:
            # Unconfirmed: the engine may deliver it again (at-least-once).
            self.ledger.failed("ack", exc)
        except asyncio.CancelledError as exc:
            if being_cancelled():
                raise
            self.ledger.failed("ack", exc)  # leaked by the SDK: a bug, reported
        else:
            self.ledger.acked(self.label, message.idem)

    async def settle(self) -> None:
        """Wait for the acks already started."""
        while self._acks:
            await asyncio.gather(*list(self._acks))

    async def cancel(self) -> None:
        tasks = list(self._acks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Crowd:
    """Every client of the test, and what went wrong with them."""

    ledger: Ledger
    publishers: list[Publisher] = field(default_factory=list)
    subscribers: list[Subscriber] = field(default_factory=list)
    sdks: list[BaseEngine] = field(default_factory=list)
    sdk_errors: list[EnSyncError] = field(default_factory=list)
    # "epoch N: labels" for every epoch in which some client did not heal in time.
    stalls: list[str] = field(default_factory=list)

    def stalled(self) -> list[str]:
        """Clients that have not done their share of work in this epoch yet."""
        publishers = [p.label for p in self.publishers]
        subscribers = [s.label for s in self.subscribers]
        return self.ledger.stalled(publishers, MIN_PUBLISHES) + self.ledger.stalled(
            subscribers, MIN_DELIVERIES
        )

    async def all_flowing(self) -> None:
        """Wait until every client works in this epoch; note the ones that do not."""
        started = time.monotonic()
        try:
            await eventually(lambda: not self.stalled(), timeout_s=HEAL_S)
        except AssertionError:
            clients = {p.label: p.client for p in self.publishers}
            clients.update((s.label, s.client) for s in self.subscribers)
            states = {label: clients[label].state.value for label in self.stalled()}
            self.stalls.append(
                f"epoch {self.ledger.epoch}: no progress in "
                f"{time.monotonic() - started:.1f} s from {states} (label: client state)"
            )


def chosen_seed() -> int:
    value = os.environ.get(SEED_ENV, "")
    return int(value) if value else random.SystemRandom().randrange(2**32)


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_sigkill_mid_stream_loses_no_publish_and_redelivers_no_ack(tmp_path: Path) -> None:
    seed = chosen_seed()
    print(f"crash test seed: {seed} (replay with {SEED_ENV}={seed})")
    crowd = Crowd(Ledger())
    engine = EngineProcess(
        tmp_path / "data", tmp_path / "logs", ["--ack-deadline-ms", str(ACK_DEADLINE_MS)]
    )
    try:
        await crash_repeatedly(engine, crowd, random.Random(seed))
        problems = contract_problems(crowd)
        # Then a clean stop, and the file it leaves.
        code = await engine.terminate()
        if code != 0:
            problems.append(f"SIGTERM: exit code {code}")
        integrity = integrity_check(engine.db)
        if integrity != ["ok"]:
            problems.append(f"integrity_check after the clean stop: {integrity[:10]}")
        logs = engine.all_logs()
        if "Traceback" in logs:
            problems.append(f"the engine logged a traceback:\n{logs[-4000:]}")
        if problems:
            problems += [f"seed {seed} (replay with {SEED_ENV}={seed})", crowd.ledger.summary()]
            pytest.fail("\n".join(problems), pytrace=False)
        print(crowd.ledger.summary())
    except BaseException as exc:
        exc.add_note(f"crash test seed: {seed} (replay with {SEED_ENV}={seed})")
        exc.add_note(crowd.ledger.summary())
        exc.add_note(f"engine logs: {engine.logs}")
        raise
    finally:
        await engine.close()


async def crash_repeatedly(engine: EngineProcess, crowd: Crowd, rng: random.Random) -> None:
    """Serve the crowd, kill the engine KILLS times, then let everything drain."""
    ledger = crowd.ledger
    sender = await create_app(engine.data, "sender")
    east = await create_app(engine.data, "east")
    west = await create_app(engine.data, "west")
    # North subscribes only at the end: its messages wait on disk through every crash.
    north = await create_app(engine.data, "north")
    await engine.start()
    stop = asyncio.Event()
    publishing: list[asyncio.Task[None]] = []
    try:
        kinds: list[tuple[BaseEngine, str]] = [
            (GrpcEngine(engine.grpc_url, **SDK_OPTIONS), "grpc"),
            (WsEngine(engine.ws_url, **SDK_OPTIONS), "ws"),
        ]
        for sdk, kind in kinds:
            crowd.sdks.append(sdk)
            sdk.on("error", crowd.sdk_errors.append)
            for app in (east, west):
                client = await sdk.create_client(app.app_key, app_secret_key=app.secret_key)
                subscriber = Subscriber(f"{app.name}-{kind}", client, app, sender, ledger)
                await subscriber.start()
                crowd.subscribers.append(subscriber)
            for n, recipients in enumerate(
                ([east.app_id, north.app_id], [east.app_id, west.app_id]), 1
            ):
                client = await sdk.create_client(sender.app_key)
                crowd.publishers.append(Publisher(f"pub{n}-{kind}", client, recipients, ledger))
        loop = asyncio.get_running_loop()
        publishing = [loop.create_task(p.run(stop), name=p.label) for p in crowd.publishers]

        for _ in range(KILLS):
            await crowd.all_flowing()
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            await engine.kill()
            # The file a crash leaves behind must be sound before any recovery.
            assert integrity_check(engine.db) == ["ok"], f"after kill {ledger.epoch + 1}"
            await asyncio.sleep(rng.uniform(0.2, 0.6))
            # Raised before the new incarnation exists: see tests/faults/ledger.py.
            ledger.epoch += 1
            await engine.start()
        await crowd.all_flowing()
        await asyncio.sleep(rng.uniform(0.2, 0.5))
        stop.set()
        await asyncio.gather(*publishing)
        for sdk, kind in kinds:
            client = await sdk.create_client(north.app_key, app_secret_key=north.secret_key)
            subscriber = Subscriber(f"north-{kind}", client, north, sender, ledger)
            await subscriber.start()
            crowd.subscribers.append(subscriber)

        with contextlib.suppress(AssertionError):  # contract_problems reports the details
            await eventually(lambda: not ledger.unseen(), timeout_s=30)
        for subscriber in crowd.subscribers:
            await subscriber.settle()
    finally:
        stop.set()
        for task in publishing:
            task.cancel()
        await asyncio.gather(*publishing, return_exceptions=True)
        for subscriber in crowd.subscribers:
            await subscriber.cancel()
        for sdk in crowd.sdks:
            await sdk.close()


def contract_problems(crowd: Crowd) -> list[str]:
    """Everything that went wrong: the delivery contract first, then how clients coped."""
    ledger = crowd.ledger
    problems = []
    lost = ledger.unseen()
    if lost:
        problems.append(f"{len(lost)} successful publishes never delivered, e.g. {lost[:3]}")
    again = ledger.redelivered_after_ack()
    if again:
        problems.append(
            f"{len(again)} deliveries after a restart of messages acked before it, e.g. {again[:3]}"
        )
    if ledger.mismatches:
        problems.append(f"deliveries unlike their publish: {ledger.mismatches[:5]}")
    if crowd.sdk_errors:
        problems.append(f"the SDK reported errors: {crowd.sdk_errors[:5]}")
    if crowd.stalls:
        problems.append("clients did not heal after a restart:\n  " + "\n  ".join(crowd.stalls))
    unexpected = {
        f"{op} {name}: {ledger.error_samples[(op, name)]!r}": count
        for (op, name), count in ledger.errors.items()
        if name not in LINK_ERRORS
    }
    if unexpected:
        problems.append(f"errors other than a lost link (error: count): {unexpected}")
    return problems
