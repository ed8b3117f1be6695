"""The pytest plugin, used as an application's own test suite would use it."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.timing import seconds

# A separate small project: its own directory and pytest configuration
# (pytest-asyncio in strict mode, the default), nothing of ours but the
# installed ensync and its plugin.
APP_TESTS = textwrap.dedent(
    """
    import asyncio

    import pytest


    @pytest.mark.asyncio
    async def test_an_order_reaches_the_warehouse(ensync_app):
        shop = await ensync_app("shop")
        warehouse = await ensync_app("warehouse", transport="ws")
        sub = await warehouse.client.subscribe("orders/created")
        idem = await shop.client.publish("orders/created", [warehouse.app_id], {"id": 1})
        async for message in sub:
            assert (message.idem, message.payload, message.sender) == (
                idem, {"id": 1}, shop.app_id
            )
            break


    @pytest.mark.asyncio
    async def test_every_test_gets_a_fresh_engine(ensync_engine, ensync_app):
        first = await ensync_app()
        assert first.name == "app-1"
        assert ensync_engine.grpc_url.startswith("grpc://127.0.0.1:")
        assert [app.name for app in await ensync_engine.engine.store.list_apps()] == ["app-1"]
    """
)


def test_an_application_tests_itself_with_the_fixtures(tmp_path: Path) -> None:
    project = tmp_path / "shop"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_orders.py").write_text(APP_TESTS)
    (project / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=project,
        capture_output=True,
        text=True,
        timeout=seconds(120),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 passed" in done.stdout
