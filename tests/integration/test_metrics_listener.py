"""/metrics off the port clients reach: a listener of its own (``--metrics``)."""

from __future__ import annotations

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from ensync.server.serving import DEFAULT_METRICS_ADDRESS, metrics_address
from ensync.testing import run_engine
from tests.support.http import http_get


def test_where_the_metrics_go() -> None:
    assert metrics_address("127.0.0.1", None) is None  # with a loopback HTTP listener
    assert metrics_address("::1", None) is None
    assert metrics_address("0.0.0.0", None) == DEFAULT_METRICS_ADDRESS == "127.0.0.1:9090"
    assert metrics_address("0.0.0.0", "10.0.0.5:9100") == "10.0.0.5:9100"
    assert metrics_address("127.0.0.1", "127.0.0.1:9100") == "127.0.0.1:9100"


async def test_a_metrics_listener_of_its_own() -> None:
    async with run_engine(metrics="127.0.0.1:0") as server:
        await server.create_app("alice")
        assert server.metrics_port != server.http_port
        status, body = await http_get(server.metrics_port, "/metrics")
        assert status == 200
        assert "ensync_published_total" in body
        # The port clients reach no longer names the apps.
        status, _ = await http_get(server.http_port, "/metrics")
        assert status == 404
        for port in (server.http_port, server.metrics_port):
            status, body = await http_get(port, "/healthz")
            assert (status, body.startswith('{"status": "ok"')) == (200, True)
        with pytest.raises(InvalidStatus) as refused:
            await connect(f"ws://127.0.0.1:{server.metrics_port}/message")
        assert refused.value.response.status_code == 404
        # WebSocket clients still use the HTTP listener.
        ws = await connect(f"ws://127.0.0.1:{server.http_port}/message")
        await ws.close()


async def test_by_default_a_loopback_http_listener_serves_the_metrics() -> None:
    async with run_engine() as server:
        assert server.metrics_port == server.http_port
        status, body = await http_get(server.http_port, "/metrics")
        assert status == 200
        assert "ensync_connected_clients" in body
