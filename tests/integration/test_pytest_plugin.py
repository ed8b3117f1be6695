"""The pytest plugin, used as an application's own test suite would use it."""

from __future__ import annotations

import shutil
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
    async def test_a_client_in_memory_shares_the_engine(ensync_app):
        shop = await ensync_app("shop", transport="memory")
        warehouse = await ensync_app("warehouse")
        sub = await warehouse.client.subscribe("orders/created")
        await shop.client.publish("orders/created", [warehouse.app_id], {"id": 2})
        async for message in sub:
            assert (message.payload, message.sender) == ({"id": 2}, shop.app_id)
            break


    @pytest.mark.asyncio
    async def test_every_test_gets_a_fresh_engine(ensync_engine, ensync_app):
        first = await ensync_app()
        assert first.name == "app-1"
        assert ensync_engine.grpc_url.startswith("grpc://127.0.0.1:")
        assert [app.name for app in await ensync_engine.engine.store.list_apps()] == ["app-1"]
    """
)


ROOT = Path(__file__).resolve().parents[2]


def application(tmp_path: Path) -> Path:
    project = tmp_path / "shop"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_orders.py").write_text(APP_TESTS)
    (project / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    return project


def run(*command: str | Path, cwd: Path | None = None, timeout_s: float = 120) -> str:
    done = subprocess.run(
        [str(part) for part in command],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=seconds(timeout_s),
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_an_application_tests_itself_with_the_fixtures(tmp_path: Path) -> None:
    project = application(tmp_path)
    run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=project)


def test_the_fixtures_need_only_ensync_pytest_and_pytest_asyncio(tmp_path: Path) -> None:
    # A fresh virtual environment holding ensync (built from a copy of this
    # source tree, as pip would from PyPI), pytest and pytest-asyncio: none of
    # our development dependencies.
    source = tmp_path / "ensync-source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    run(
        python, "-m", "pip", "install", "--quiet", source, "pytest", "pytest-asyncio", timeout_s=600
    )
    installed = run(python, "-m", "pip", "list", "--format=freeze").lower()
    for absent in ("pydantic", "hypothesis", "pytest-cov", "nats-py", "ensync-sdk"):
        assert f"{absent}==" not in installed
    project = application(tmp_path)
    out = run(python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests", cwd=project)
    assert f"{APP_TESTS.count('async def test_')} passed" in out
