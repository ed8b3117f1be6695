"""The ``ensync`` command line, run as real processes."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ensync import EnSyncAuthError, EnSyncEngine, Message
from ensync.crypto import decode_app_id, decode_secret_key
from ensync.testing.process import dies_with_parent
from tests.support.cli import Serving, ensync, free_port, serve, wait_listening
from tests.support.timing import eventually, seconds


@pytest.fixture
async def serving(tmp_path: Path) -> AsyncIterator[Serving]:
    async with serve(tmp_path) as running:
        yield running


def test_keygen_prints_a_usable_key_pair() -> None:
    result = ensync("keygen", "--json")
    assert result.returncode == 0, result.stderr
    pair = json.loads(result.stdout)
    assert set(pair) == {"app_id", "secret_key"}
    assert len(decode_app_id(pair["app_id"])) == 32
    assert len(decode_secret_key(pair["secret_key"])) == 64
    text = ensync("keygen")
    assert "app id:" in text.stdout
    assert "secret key:" in text.stdout


async def test_app_created_while_serving_connects_at_once(serving: Serving) -> None:
    created = ensync("app", "create", "orders", "--data", str(serving.data), "--json")
    assert created.returncode == 0, created.stderr
    orders = json.loads(created.stdout)
    assert set(orders) == {"name", "app_key", "app_id", "secret_key"}
    assert orders["name"] == "orders"
    warehouse = json.loads(
        ensync("app", "create", "warehouse", "--data", str(serving.data), "--json").stdout
    )
    engine = EnSyncEngine(f"grpc://127.0.0.1:{serving.grpc_port}")
    try:
        sender = await engine.create_client(orders["app_key"])
        receiver = await engine.create_client(
            warehouse["app_key"], app_secret_key=warehouse["secret_key"]
        )
        got: list[Message] = []
        (await receiver.subscribe("orders/created")).on(got.append)
        await sender.publish("orders/created", [warehouse["app_id"]], {"id": 7})
        await eventually(lambda: len(got) == 1)
        assert got[0].payload == {"id": 7}
        assert got[0].sender == orders["app_id"]

        listed = ensync("app", "list", "--json", env={"ENSYNC_DATA": str(serving.data)})
        assert "no engine is serving" not in listed.stderr  # this one is
        rows = json.loads(listed.stdout)
        assert [(r["name"], r["revoked"]) for r in rows] == [
            ("orders", False),
            ("warehouse", False),
        ]
        assert "app_key" not in listed.stdout
        assert orders["app_key"] not in listed.stdout

        revoked = ensync("app", "revoke", "orders", "--data", str(serving.data))
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(EnSyncAuthError):
            await engine.create_client(orders["app_key"])
    finally:
        await engine.close()


async def test_publish_from_the_command_line(serving: Serving, tmp_path: Path) -> None:
    shop = json.loads(ensync("app", "create", "shop", "--data", str(serving.data), "--json").stdout)
    warehouse = json.loads(
        ensync("app", "create", "warehouse", "--data", str(serving.data), "--json").stdout
    )
    engine = EnSyncEngine(f"grpc://127.0.0.1:{serving.grpc_port}")
    try:
        receiver = await engine.create_client(
            warehouse["app_key"], app_secret_key=warehouse["secret_key"]
        )
        got: list[Message] = []
        (await receiver.subscribe("orders/created")).on(got.append)
        payload_file = tmp_path / "order.json"
        payload_file.write_text('{"id": 7}')
        url = f"grpc://127.0.0.1:{serving.grpc_port}"
        sent = await asyncio.to_thread(
            ensync,
            "publish",
            "orders/created",
            "--to",
            warehouse["app_id"],
            "--payload",
            f"@{payload_file}",
            "--header",
            "source=cli",
            "--url",
            url,
            env={"ENSYNC_APP_KEY": shop["app_key"]},
        )
        assert sent.returncode == 0, sent.stderr
        idem = sent.stdout.strip()
        await eventually(lambda: len(got) == 1)
        assert (got[0].idem, got[0].payload, got[0].sender) == (idem, {"id": 7}, shop["app_id"])
        assert got[0].headers["source"] == "cli"
        # Mistakes are named, with a usage (2) or refusal (1) exit code.
        no_key = ensync("publish", "x", "--to", warehouse["app_id"], "--url", url)
        assert (no_key.returncode, "ENSYNC_APP_KEY" in no_key.stderr) == (2, True)
        env = {"ENSYNC_APP_KEY": shop["app_key"], "ENSYNC_URL": url}
        bad_json = ensync("publish", "x", "--to", warehouse["app_id"], "--payload", "{", env=env)
        assert (bad_json.returncode, "not readable JSON" in bad_json.stderr) == (2, True)
        refused = ensync("publish", "bad;name", "--to", warehouse["app_id"], env=env)
        assert refused.returncode == 1
        assert "malformed message name" in refused.stderr
    finally:
        await engine.close()


async def test_dead_letters_are_listed_and_shown(serving: Serving) -> None:
    data = str(serving.data)
    shop = json.loads(ensync("app", "create", "shop", "--data", data, "--json").stdout)
    warehouse = json.loads(ensync("app", "create", "warehouse", "--data", data, "--json").stdout)
    engine = EnSyncEngine(f"grpc://127.0.0.1:{serving.grpc_port}")
    try:
        sender = await engine.create_client(shop["app_key"])
        receiver = await engine.create_client(
            warehouse["app_key"], app_secret_key=warehouse["secret_key"]
        )
        sub = await receiver.subscribe("orders/created", auto_ack=False)
        idem = await sender.publish("orders/created", [warehouse["app_id"]], {"id": 7})
        async for message in sub:
            await sub.discard(message.idem, "no such order")
            break
    finally:
        await engine.close()
    listed = await asyncio.to_thread(ensync, "dlq", "list", "--data", data, "--json")
    assert listed.returncode == 0, listed.stderr
    (record,) = [json.loads(line) for line in listed.stdout.splitlines()]
    assert (record["idem"], record["name"], record["recipient"], record["sender"]) == (
        idem,
        "orders/created",
        "warehouse",
        "shop",
    )
    assert record["reason"] == "discarded: no such order"
    text = ensync("dlq", "list", "--app", "warehouse", "--data", data)
    assert text.stdout == f"{idem}\twarehouse\torders/created\tdiscarded: no such order\n"
    shown = ensync("dlq", "show", idem, "--data", data, "--secret-key", warehouse["secret_key"])
    assert shown.returncode == 0, shown.stderr
    assert 'payload:        {"id": 7}' in shown.stdout
    assert "state:          dead" in shown.stdout
    sealed = json.loads(ensync("dlq", "show", idem, "--data", data, "--json").stdout)
    assert "payload" not in sealed  # without the secret key: the envelope's size only
    assert sealed["envelope_bytes"] > 0
    for args, complaint in (
        (("dlq", "show", "nope", "--data", data), "no message 'nope'"),
        (("dlq", "list", "--app", "ghost", "--data", data), "no app named 'ghost'"),
    ):
        missing = ensync(*args)
        assert (missing.returncode, complaint in missing.stderr) == (1, True)


def test_app_commands_report_mistakes(tmp_path: Path) -> None:
    data = str(tmp_path)
    assert ensync("app", "create", "ok", "--data", data).returncode == 0
    duplicate = ensync("app", "create", "ok", "--data", data)
    assert duplicate.returncode == 1
    assert "already exists" in duplicate.stderr
    bad = ensync("app", "create", "no spaces", "--data", data)
    assert bad.returncode == 2
    assert "invalid app name" in bad.stderr
    missing = ensync("app", "revoke", "ghost", "--data", data)
    assert missing.returncode == 1
    assert "ghost" in missing.stderr
    store = ensync("app", "list", "--data", data, "--store", "mongodb://x")
    assert store.returncode == 2
    assert "mongodb://x" in store.stderr


def test_app_commands_say_when_no_engine_serves_the_directory(tmp_path: Path) -> None:
    created = ensync("app", "create", "orders", "--data", str(tmp_path / "elsewhere"))
    assert created.returncode == 0  # preparing data offline still works
    assert f"no engine is serving {tmp_path / 'elsewhere' / 'ensync.db'}" in created.stderr
    assert "another --data directory" in created.stderr


async def test_a_second_engine_on_the_same_directory_is_refused(serving: Serving) -> None:
    second = ensync(
        "serve",
        "--data",
        str(serving.data),
        "--grpc",
        f"127.0.0.1:{free_port()}",
        "--http",
        f"127.0.0.1:{free_port()}",
    )
    assert second.returncode == 1
    assert f"another engine (pid {serving.process.pid}) is already serving" in second.stderr
    assert str(serving.data) in second.stderr


def test_version_and_python_dash_m_and_serve_help_shows_defaults() -> None:
    from ensync import __version__

    for command in (
        [sys.executable, "-m", "ensync", "--version"],
        [sys.executable, "-m", "ensync.cli.main", "--version"],
    ):
        shown = subprocess.run(command, capture_output=True, text=True, check=False)
        assert (shown.returncode, shown.stdout) == (0, f"ensync {__version__}\n")
    help_text = " ".join(ensync("serve", "--help").stdout.split())
    for default in (
        "gRPC HOST:PORT (default: 127.0.0.1:50051)",
        "HTTP HOST:PORT (default: 127.0.0.1:8080)",
        "(default: INFO)",
        "(default: .ensync)",
    ):
        assert default in help_text
    assert "None" not in help_text


def test_serve_refuses_bad_addresses(tmp_path: Path) -> None:
    result = ensync("serve", "--data", str(tmp_path), "--grpc", "nonsense")
    assert result.returncode != 0
    assert "nonsense" in result.stderr


async def test_sigterm_shuts_down_cleanly(serving: Serving) -> None:
    serving.process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(serving.process.wait(), seconds(15))
    assert serving.process.returncode == 0
    assert serving.process.stderr is not None
    err = (await serving.process.stderr.read()).decode()
    assert "shutting down" in err
    assert "Traceback" not in err


async def test_json_logs_and_one_start_up_line(tmp_path: Path) -> None:
    grpc_port = free_port()
    process = await asyncio.create_subprocess_exec(
        *dies_with_parent(
            [
                sys.executable,
                *("-m", "ensync", "serve", "--data", str(tmp_path)),
                *("--grpc", f"127.0.0.1:{grpc_port}", "--http", f"127.0.0.1:{free_port()}"),
                *("--log-format", "json"),
            ]
        ),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_listening(grpc_port, process)
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), seconds(15))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    lines = (await process.stderr.read()).decode().splitlines()
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(set(r) >= {"time", "level", "logger", "message"} for r in records)
    started = [r for r in records if "serving gRPC on" in r["message"]]
    assert len(started) == 1
    assert f"127.0.0.1:{grpc_port}" in started[0]["message"]
    assert started[0]["level"] == "INFO"
    assert any(r["message"] == "shutting down" for r in records)


def test_bench_prints_its_figures_as_json() -> None:
    result = ensync("bench", "--messages", "200", "--json")
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert figures["messages"] == figures["received"] == 200
    assert figures["transport"] == "grpc"
    for key in ("end_to_end_rate", "latency_p50_ms", "latency_p99_ms", "engine_cpu_percent"):
        assert figures[key] > 0, key
    assert figures["latency_p50_ms"] <= figures["latency_p99_ms"]
    assert "received 200/200" in result.stderr  # the progress display


def test_bench_refuses_bad_arguments() -> None:
    result = ensync("bench", "--messages", "0")
    assert result.returncode == 2
    assert "--messages" in result.stderr
