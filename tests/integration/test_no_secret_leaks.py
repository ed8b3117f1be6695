"""Secrets never leak (DESIGN.md §6, STYLE.md habit 12).

App keys, secret keys and payloads must not appear in logs, error messages
or metrics. Each test here drives a path likely to leak, with ``ensync``
logging at DEBUG, and checks its own logs and errors, so a leak fails a named
test. tests/support/leaks.py runs the same scan over the whole test run; the
last tests here check that scanner itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from ensync import EnSyncAuthError, EnSyncError, EnSyncMessageError, Message
from ensync import EnSyncEngine as GrpcEngine
from ensync.client.engine import BaseEngine
from ensync.crypto import generate_keypair, seal
from ensync.server.core.apps import NewApp
from ensync.server.core.ids import new_app_key
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.faults.engine_process import EngineProcess, create_app
from tests.support.engine_calls import Calls
from tests.support.leaks import (
    LeakWatch,
    Needle,
    RecordCollector,
    SecretBook,
    assert_no_leaks,
    capture_logs,
    find_leaks,
    needles_for_app,
    needles_for_app_key,
    needles_for_marker,
    new_marker,
    record_app,
    record_text,
)
from tests.support.timing import eventually, seconds

TRANSPORTS = ["grpc", "ws"]
ROOT = Path(__file__).resolve().parents[2]


def make_engine(url_of: TestServer | EngineProcess, transport: str) -> BaseEngine:
    if transport == "grpc":
        return GrpcEngine(url_of.grpc_url, max_reconnect_attempts=0)
    return WsEngine(url_of.ws_url, max_reconnect_attempts=0)


def error_text(error: BaseException) -> str:
    """Everything an application could print about ``error``: str, repr, the
    traceback with every chained cause."""
    return f"{error}\n{error!r}\n" + "".join(traceback.format_exception(error))


@dataclass
class Apps:
    """Three apps of one engine; carol's key is the "wrong" secret key."""

    alice: NewApp
    bob: NewApp
    carol: NewApp

    def needles(self, *markers: str) -> list[Needle]:
        found = [n for app in (self.alice, self.bob, self.carol) for n in needles_for_app(app)]
        for marker in markers:
            found += needles_for_marker(marker)
        return found


@pytest.fixture
async def apps(server: TestServer) -> Apps:
    return Apps(
        await server.create_app("alice"),
        await server.create_app("bob"),
        await server.create_app("carol"),
    )


async def http_get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = (await asyncio.wait_for(reader.read(), seconds(10))).decode()
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition("\r\n\r\n")
    assert head.split()[1] == "200", head
    return body


# --- refused keys ---------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_wrong_app_key_is_not_echoed(
    server: TestServer, apps: Apps, transport: str
) -> None:
    wrong = new_app_key()
    # One character off alice's key: an echo would show most of a real key.
    near = apps.alice.app_key[:-1] + ("A" if apps.alice.app_key[-1] != "A" else "B")
    needles = apps.needles() + needles_for_app_key(wrong, "the wrong key")
    engine = make_engine(server, transport)
    texts: list[tuple[str, str]] = []
    try:
        with capture_logs() as logs:
            for key in (wrong, near):
                with pytest.raises(EnSyncAuthError) as refused:
                    await engine.create_client(key)
                assert key not in str(refused.value)
                texts.append((f"{transport} refusal", error_text(refused.value)))
    finally:
        await engine.close()
    assert_no_leaks([*texts, ("logs", logs.text())], needles)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_revoked_app_key_is_not_echoed(
    server: TestServer, apps: Apps, transport: str
) -> None:
    await server.engine.apps.revoke("carol")
    engine = make_engine(server, transport)
    try:
        with capture_logs() as logs, pytest.raises(EnSyncAuthError) as refused:
            await engine.create_client(apps.carol.app_key)
    finally:
        await engine.close()
    assert apps.carol.app_key not in str(refused.value)
    assert_no_leaks([("refusal", error_text(refused.value)), ("logs", logs.text())], apps.needles())


async def test_refused_conn_frames_do_not_echo_the_key(server: TestServer, apps: Apps) -> None:
    await server.engine.apps.revoke("carol")
    wrong = new_app_key()
    needles = apps.needles() + needles_for_app_key(wrong, "the wrong key")
    replies: list[tuple[str, str]] = []
    with capture_logs() as logs:
        async with connect(f"{server.ws_url}/message") as ws:
            for key in (wrong, apps.carol.app_key, apps.alice.app_key + "x", wrong + " ;,="):
                await ws.send(f"CONN;ACCESS_KEY=:{key}")
                reply = str(await asyncio.wait_for(ws.recv(), seconds(5)))
                assert reply.startswith("-FAIL:"), reply
                replies.append(("CONN reply", reply))
    assert_no_leaks([*replies, ("logs", logs.text())], needles)


async def test_malformed_conn_frames_do_not_echo_the_key(server: TestServer) -> None:
    # These were once answered with the frame's first 40 characters: 23 of
    # the key's 43 random ones (fixed in 73704fa, wscodec).
    key = new_app_key()
    replies: list[tuple[str, str]] = []
    async with connect(f"{server.ws_url}/message") as ws:
        for frame in (
            f"CONN;ACCESS_KEY={key}",  # ':' missing
            f"CONN:ACCESS_KEY=:{key}",  # ':' for ';': no such command
            key,  # the key alone
            f"CONN;ACCESS_KEY=:{key}\nCONN;ACCESS_KEY=:{key}",
        ):
            await ws.send(frame)
            reply = str(await asyncio.wait_for(ws.recv(), seconds(5)))
            assert reply.startswith("-FAIL:"), reply
            replies.append((f"reply to {frame[:14]!r}", reply))
    assert_no_leaks(replies, needles_for_app_key(key, "the sent key"))


# --- receiving ------------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_an_undecryptable_message_reports_neither_key_nor_payload(
    server: TestServer, apps: Apps, transport: str
) -> None:
    marker = new_marker("undecryptable")
    sender, receiver = make_engine(server, transport), make_engine(server, transport)
    reported: list[EnSyncError] = []
    receiver.on("error", reported.append)
    try:
        with capture_logs() as logs:
            alice = await sender.create_client(apps.alice.app_key)
            bob = await receiver.create_client(apps.bob.app_key, app_secret_key=apps.bob.secret_key)
            subscription = await bob.subscribe("leaks/undecryptable")
            opened: list[Message] = []
            subscription.on(opened.append)  # a consumer, so messages are taken up
            # Sealed for carol but sent to bob (the SDK would seal it for bob):
            # bob's key cannot open it.
            sealed = seal(json.dumps({"secret": marker}).encode(), apps.carol.app_id)
            await Calls(server.engine).publish(
                alice.client_id, "leaks/undecryptable", sealed, apps.bob.app_id, "{}"
            )
            await eventually(
                lambda: any(isinstance(e, EnSyncMessageError) for e in reported),
                what="the decryption failure to be reported",
            )
    finally:
        await sender.close()
        await receiver.close()
    assert opened == []
    texts = [(f"reported {type(e).__name__}", error_text(e)) for e in reported]
    assert_no_leaks([*texts, ("logs", logs.text())], apps.needles(marker))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_failing_handler_logs_neither_key_nor_payload(
    server: TestServer, apps: Apps, transport: str
) -> None:
    marker = new_marker("handler")
    sender, receiver = make_engine(server, transport), make_engine(server, transport)
    reported: list[EnSyncError] = []
    receiver.on("error", reported.append)
    seen: list[Message] = []

    def explode(message: Message) -> None:
        seen.append(message)
        raise RuntimeError("the handler exploded")  # names no payload: the test's choice

    try:
        with capture_logs() as logs:
            alice = await sender.create_client(apps.alice.app_key)
            bob = await receiver.create_client(apps.bob.app_key, app_secret_key=apps.bob.secret_key)
            (await bob.subscribe("leaks/handler")).on(explode)
            await alice.publish("leaks/handler", [apps.bob.app_id], {"secret": marker})
            await eventually(lambda: bool(reported), what="the handler failure to be reported")
            await eventually(
                lambda: "the handler exploded" in logs.text(), what="the failure to be logged"
            )
    finally:
        await sender.close()
        await receiver.close()
    assert seen[0].payload == {"secret": marker}
    texts = [(f"reported {type(e).__name__}", error_text(e)) for e in reported]
    assert_no_leaks([*texts, ("logs", logs.text())], apps.needles(marker))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_published_plaintext_is_never_logged(
    server: TestServer, apps: Apps, transport: str
) -> None:
    markers = [new_marker("persisted"), new_marker("volatile"), new_marker("hybrid")]
    sender, receiver = make_engine(server, transport), make_engine(server, transport)
    got: list[Message] = []
    try:
        with capture_logs() as logs:
            alice = await sender.create_client(apps.alice.app_key)
            bob = await receiver.create_client(apps.bob.app_key, app_secret_key=apps.bob.secret_key)
            subscription = await bob.subscribe("leaks/plain")
            subscription.on(got.append)
            await alice.publish("leaks/plain", [apps.bob.app_id], {"secret": markers[0]})
            await alice.publish(
                "leaks/plain",
                [apps.bob.app_id],
                {"secret": markers[1]},
                {"persist": False, "headers": {"kind": "volatile"}},
            )
            await alice.publish(
                "leaks/plain",
                [apps.bob.app_id, apps.carol.app_id],
                {"secret": markers[2]},
                hybrid=True,
            )
            await eventually(lambda: len(got) == 3, what="three deliveries")
            replayed = await subscription.replay(got[0].idem)
    finally:
        await sender.close()
        await receiver.close()
    assert sorted(m.payload["secret"] for m in got) == sorted(markers)
    assert replayed.payload == {"secret": markers[0]}
    metrics = await http_get(server.http_port, "/metrics")
    assert_no_leaks([("logs", logs.text()), ("metrics", metrics)], apps.needles(*markers))


async def test_a_refused_publish_does_not_echo_the_payload() -> None:
    async with run_engine(max_payload_bytes=2048) as small:
        alice, bob = await small.create_app("alice"), await small.create_app("bob")
        marker = new_marker("oversized")
        engine = GrpcEngine(small.grpc_url, max_reconnect_attempts=0)
        refusals: list[tuple[str, str]] = []
        try:
            with capture_logs() as logs:
                client = await engine.create_client(alice.app_key)
                for payload in (
                    {"secret": marker * 200},  # over the engine's limit
                    {"secret": marker, "x": float("nan")},  # not JSON: refused by the SDK
                    {"secret": marker.encode()},
                    {"secret": {marker}},
                ):
                    with pytest.raises(EnSyncError) as refused:
                        await client.publish("leaks/refused", [bob.app_id], payload)
                    refusals.append((type(refused.value).__name__, error_text(refused.value)))
        finally:
            await engine.close()
    needles = needles_for_app(alice) + needles_for_app(bob) + needles_for_marker(marker)
    assert_no_leaks([*refusals, ("logs", logs.text())], needles)


# --- metrics --------------------------------------------------------------------


async def test_metrics_name_apps_but_show_no_secret(server: TestServer, apps: Apps) -> None:
    marker = new_marker("metrics")
    grpc, ws = make_engine(server, "grpc"), make_engine(server, "ws")
    try:
        alice = await grpc.create_client(apps.alice.app_key)
        await ws.create_client(apps.bob.app_key, app_secret_key=apps.bob.secret_key)
        with pytest.raises(EnSyncAuthError):
            await grpc.create_client(new_app_key())
        # Left pending: the backlog gauge has a row for bob.
        await alice.publish("leaks/metrics", [apps.bob.app_id], {"secret": marker})
        metrics = await http_get(server.http_port, "/metrics")
        health = await http_get(server.http_port, "/healthz")
    finally:
        await grpc.close()
        await ws.close()
    record_text("GET /metrics", metrics)
    assert 'ensync_backlog{app="bob"} 1.0' in metrics
    assert "ensync_rejected_total 1.0" in metrics
    assert_no_leaks([("metrics", metrics), ("healthz", health)], apps.needles(marker))


# --- the command line and the engine as a process --------------------------------


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ensync.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=seconds(60),
        check=False,
    )


def test_cli_app_list_and_revoke_show_no_key(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    created: list[NewApp] = []
    for name in ("alice", "bob"):
        result = cli("app", "create", name, "--data", data, "--json")
        assert result.returncode == 0, result.stderr
        created.append(NewApp(**json.loads(result.stdout)))
        record_app(created[-1])
    outputs: list[tuple[str, str]] = []
    for args in (["list"], ["list", "--json"], ["revoke", "bob"], ["list"]):
        result = cli("app", *args, "--data", data)
        assert result.returncode == 0, result.stderr
        outputs += [(f"app {' '.join(args)} stdout", result.stdout)]
        outputs += [(f"app {' '.join(args)} stderr", result.stderr)]
        record_text(f"ensync app {' '.join(args)}", result.stdout + result.stderr)
    assert created[0].app_id in outputs[0][1]  # the list does show apps
    assert "revoked" in outputs[-2][1]
    needles = [n for app in created for n in needles_for_app(app)]
    assert_no_leaks(outputs, needles)


async def test_an_engine_process_at_debug_logs_no_secret(tmp_path: Path) -> None:
    data = tmp_path / "data"
    keys = [await create_app(data, name) for name in ("alice", "bob", "carol")]
    alice, bob, carol = (NewApp(k.name, k.app_key, k.app_id, k.secret_key) for k in keys)
    for app in (alice, bob, carol):
        record_app(app)
    marker = new_marker("engine-process")
    revoked = await asyncio.to_thread(cli, "app", "revoke", "carol", "--data", str(data))
    assert revoked.returncode == 0, revoked.stderr
    engine = EngineProcess(data, tmp_path / "logs", ["--log-level", "debug"])
    got: list[Message] = []
    clients: list[BaseEngine] = []
    try:
        await engine.start()
        for transport in TRANSPORTS:
            sender, receiver = make_engine(engine, transport), make_engine(engine, transport)
            clients += [sender, receiver]
            for key in (new_app_key(), carol.app_key):
                with pytest.raises(EnSyncAuthError):
                    await sender.create_client(key)
            publisher = await sender.create_client(alice.app_key)
            subscriber = await receiver.create_client(bob.app_key, app_secret_key=bob.secret_key)
            (await subscriber.subscribe(f"leaks/{transport}")).on(got.append)
            await publisher.publish(f"leaks/{transport}", [bob.app_id], {"secret": marker})
        await eventually(lambda: len(got) == 2, what="both deliveries")
        metrics = await http_get(engine.http_port, "/metrics")
        for client in clients:
            await client.close()
        assert await engine.terminate() == 0
    finally:
        for client in clients:
            await client.close()
        await engine.close()
    log = engine.all_logs()
    assert "DEBUG" in log  # the engine did log at DEBUG
    needles = [n for app in (alice, bob, carol) for n in needles_for_app(app)]
    needles += needles_for_marker(marker)
    assert_no_leaks([("engine log", log), ("metrics", metrics)], needles)


# --- the session scanner ----------------------------------------------------------


def fake_app(name: str) -> NewApp:
    pair = generate_keypair()
    return NewApp(name, new_app_key(), pair.app_id, pair.secret_key)


def fake_record(
    message: str, *args: object, name: str = "ensync.fake", exc: BaseException | None = None
) -> logging.LogRecord:
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord(name, logging.WARNING, __file__, 1, message, args, exc_info)


def test_the_scanner_reports_a_recorded_secret_in_a_log_record() -> None:
    app, other = fake_app("leaky"), fake_app("quiet")
    watch = LeakWatch()  # not started: it patches nothing and fails no session
    watch.book.add_app(app)
    watch.book.add_app(other)
    watch.collector.current_test = "test_fake"
    watch.collector.handle(fake_record("connected with %s", app.app_key))
    watch.collector.handle(fake_record("client %s connected", app.app_id, name="ensync.ok"))
    leaks = watch.scan()
    assert len(leaks) == 1
    report = leaks[0].describe()
    assert "app key of app 'leaky'" in report
    assert "in full" in report
    assert "log record ensync.fake WARNING during test_fake" in report
    assert app.app_key not in report  # the report masks what it found
    assert app.app_key[:8] in report


def test_the_scanner_finds_secrets_in_exception_text_and_error_messages() -> None:
    app = fake_app("leaky")
    watch = LeakWatch()
    watch.book.add_app(app)
    try:
        raise ValueError(f"bad key {app.secret_key}")
    except ValueError as exc:
        watch.collector.handle(fake_record("request failed", exc=exc))
    watch.error_message(f"refused {app.app_key[:24]}")  # a 19-character prefix of the key
    sources = sorted(leak.source.split(" ")[0] for leak in watch.scan())
    assert sources == ["EnSyncError/ServiceError", "log"]


@pytest.mark.parametrize(
    "form",
    ["seed-base64", "seed-hex", "scalar-hex", "key-hex", "key-unpadded", "key-prefix"],
)
def test_the_scanner_knows_the_encodings_of_a_key(form: str) -> None:
    import base64

    from nacl import bindings

    app = fake_app("leaky")
    raw = base64.b64decode(app.secret_key)
    token = app.app_key.removeprefix("ensk_")
    text = {
        "seed-base64": base64.b64encode(raw[:32]).decode(),
        "seed-hex": raw[:32].hex(),
        "scalar-hex": bindings.crypto_sign_ed25519_sk_to_curve25519(raw).hex(),
        "key-hex": base64.urlsafe_b64decode(token + "=").hex(),
        "key-unpadded": app.secret_key.rstrip("="),
        "key-prefix": f"key={app.app_key[:22]}...",
    }[form]
    leaks = find_leaks([("text", f"x {text} y")], needles_for_app(app))
    assert len(leaks) == 1, leaks


def test_the_scanner_ignores_public_ids_short_fragments_and_marker_prefixes() -> None:
    app = fake_app("quiet")
    book = SecretBook()
    book.add_app(app)
    book.add_app_key(app.app_id, "a caller who passed an app id as a key")
    marker = f"leak-marker-{secrets.token_hex(12)}"  # a prefix any test could contain
    book.add(needles_for_marker(marker, partial=False))
    clean = f"app {app.app_id} ok; client {app.app_key[5:13]}; {marker[:-1]}; {app.secret_key[:15]}"
    assert find_leaks([("text", clean)], book.needles()) == []
    assert len(find_leaks([("text", f"[{marker}]")], book.needles())) == 1


def test_a_collector_keeps_ensync_debug_but_not_other_debug() -> None:
    collector = RecordCollector()
    for name, level in [
        ("ensync.client", logging.DEBUG),
        ("websockets.client", logging.DEBUG),
        ("websockets.client", logging.INFO),
        ("ensyncish", logging.DEBUG),
    ]:
        collector.handle(logging.LogRecord(name, level, __file__, 1, "m", None, None))
    assert [(n, lvl) for _, n, lvl, _ in collector.records] == [
        ("ensync.client", "DEBUG"),
        ("websockets.client", "INFO"),
    ]


_LEAKY_TEST = """
import asyncio, logging

from ensync.server.core.apps import AppRegistry
from ensync.server.store.memory import MemoryStore


def test_logs_a_key() -> None:
    async def go() -> str:
        store = MemoryStore()
        await store.open()
        app = await AppRegistry(store, lambda: 0, cache_ms=0).create("leaky")
        return app.app_key

    key = asyncio.run(go())
    logging.getLogger("ensync.fake").warning("connecting with %s", key)
"""


def test_a_leak_makes_the_run_fail_though_every_test_passed(tmp_path: Path) -> None:
    (tmp_path / "test_leaky.py").write_text(_LEAKY_TEST)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.support.leaks",
            "--rootdir",
            str(tmp_path),
            str(tmp_path / "test_leaky.py"),
        ],
        capture_output=True,
        text=True,
        timeout=seconds(120),
        cwd=tmp_path,
        env=env,
        check=False,
    )
    out = result.stdout
    assert "1 passed" in out, out + result.stderr
    assert result.returncode == 1, out + result.stderr
    assert "secret leaks" in out
    assert "1 passed, 1 secret leak(s)" in out
    assert "app key of app 'leaky'" in out
    assert "log record ensync.fake WARNING during test_leaky.py::test_logs_a_key" in out
