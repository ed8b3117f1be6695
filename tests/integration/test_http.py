"""The HTTP listener: health checks."""

from __future__ import annotations

import json

from ensync.testing import TestServer
from tests.support.http import http_get


async def test_healthz_reports_the_engine(server: TestServer) -> None:
    status, body = await http_get(server.http_port, "/healthz")
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "ok"
    assert health["sessions"] == 0


async def test_unknown_paths_are_not_found(server: TestServer) -> None:
    status, _ = await http_get(server.http_port, "/nope")
    assert status == 404
