"""The engine logs refusals and store failures: each kind at most once a second,
with a count."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3

import pytest

from ensync import EnSyncAuthError, EnSyncEngine, EnSyncPublishError
from ensync.server.store.base import StoreError
from ensync.server.store.sqlite import SqliteStore
from ensync.testing import TestServer, run_engine
from ensync.websocket import EnSyncEngine as WsEngine
from tests.support.http import http_get


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.getMessage().startswith("refused (")
    ]


async def test_refusals_are_logged_once_a_second_per_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ensync.server")
    async with run_engine(max_metadata_bytes=100) as server:
        alice = await server.create_app("alice")
        engine = EnSyncEngine(server.grpc_url, max_reconnect_attempts=1)
        try:
            for _ in range(3):
                with pytest.raises(EnSyncAuthError):
                    await engine.create_client("ensk_not-a-key")
            assert refusals(caplog) == [
                "refused (app key): connect: app key is not valid (unknown or revoked)"
            ]
            client = await engine.create_client(alice.app_key)
            with pytest.raises(EnSyncPublishError, match="limit"):
                await client.publish("big", [alice.app_id], {"a": 1}, {"headers": {"h": "x" * 200}})
            assert refusals(caplog)[1].startswith("refused (metadata_size): metadata is")
            await asyncio.sleep(1.05)
            with pytest.raises(EnSyncAuthError):
                await engine.create_client("ensk_not-a-key")
            assert refusals(caplog)[2] == (
                "refused (app key): connect: app key is not valid (unknown or revoked)"
                " (and 2 more like it since the last line)"
            )
            assert "ensk_not-a-key" not in caplog.text  # never the key itself
        finally:
            await engine.close()


async def _max_pages(server: TestServer, pages: int | None) -> None:
    """Cap the database's size at ``pages`` (None: its size now): SQLite then
    fails writes with SQLITE_FULL, as on a full disk."""

    def cap(conn: sqlite3.Connection) -> None:
        (count,) = conn.execute("PRAGMA page_count").fetchone()
        conn.execute(f"PRAGMA max_page_count = {count if pages is None else pages}")

    store = server.engine.store
    assert isinstance(store, SqliteStore)
    await store._runner.write(cap)


async def test_a_full_store_shows_in_health_and_metrics_and_logs_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="ensync.server")
    async with run_engine("sqlite:") as server:
        alice = await server.create_app("alice")
        engine = EnSyncEngine(server.grpc_url)
        try:
            client = await engine.create_client(alice.app_key)
            await client.publish("orders/created", [alice.app_id], {"n": 0})
            status, body = await http_get(server.http_port, "/healthz")
            assert (status, json.loads(body)["status"]) == (200, "ok")
            await _max_pages(server, None)
            outcomes = await asyncio.gather(
                *(
                    client.publish("orders/created", [alice.app_id], {"n": n, "x": "y" * 2000})
                    for n in range(60)
                ),
                return_exceptions=True,
            )
            refused = [o for o in outcomes if isinstance(o, EnSyncPublishError)]
            assert len(refused) >= 40
            assert all("retry later" in str(error) for error in refused)
            status, body = await http_get(server.http_port, "/healthz")
            health = json.loads(body)
            assert (status, health["status"]) == (503, "store failing")
            assert "full" in health["store_error"]
            _, metrics = await http_get(server.http_port, "/metrics")
            assert "ensync_store_failing 1.0" in metrics
            assert 'ensync_store_failures_total{operation="publish"}' in metrics
            lines = [
                record.getMessage()
                for record in caplog.records
                if record.getMessage().startswith("store failed (publish)")
            ]
            assert 1 <= len(lines) <= 3, lines  # ~1 a second, never one per publish
            # Room again: publishes work, health is back, the log says so.
            await _max_pages(server, 1_000_000)
            await client.publish("orders/created", [alice.app_id], {"n": "again"})
            status, body = await http_get(server.http_port, "/healthz")
            assert (status, json.loads(body)["status"]) == (200, "ok")
            _, metrics = await http_get(server.http_port, "/metrics")
            assert "ensync_store_failing 0.0" in metrics
            assert any("takes writes again" in r.getMessage() for r in caplog.records)
        finally:
            await engine.close()


@pytest.mark.parametrize("transport", ["grpc", "ws"])
async def test_a_store_that_fails_a_recipients_lookup_refuses_the_publish_only(
    transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Out of descriptors, SQLite's readers cannot open a connection: the
    # publish hears "retry later", and the client's session goes on.
    async with run_engine("sqlite:", app_cache_ms=0) as server:
        alice = await server.create_app("alice")
        engine = EnSyncEngine(server.grpc_url) if transport == "grpc" else WsEngine(server.ws_url)
        try:
            client = await engine.create_client(alice.app_key)
            await client.publish("orders/created", [alice.app_id], {"n": 1})

            async def unreadable(app_id: str) -> None:
                raise StoreError("reading the apps failed: too many open files")

            monkeypatch.setattr(server.engine.store, "get_app", unreadable)
            with pytest.raises(EnSyncPublishError, match="retry later"):
                await client.publish("orders/created", [alice.app_id], {"n": 2})
            monkeypatch.undo()
            await client.publish("orders/created", [alice.app_id], {"n": 3})
            assert server.engine.sessions  # the same session throughout
        finally:
            await engine.close()
