"""A test that times out fails alone: the tests after it get fresh fixtures."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The shape of an engine's teardown: tasks in a TaskGroup, busy when the
# timeout fires, so pytest-timeout's failure is raised inside one of them.
SCENARIO = """
import asyncio, time
import pytest

async def busy():
    while True:
        started = time.monotonic()
        while time.monotonic() - started < 0.005:
            pass
        await asyncio.sleep(0)

@pytest.fixture
async def engine(tmp_path):
    async def supervise():
        async with asyncio.TaskGroup() as group:
            group.create_task(busy())
    supervisor = asyncio.create_task(supervise())
    yield tmp_path
    await supervisor

async def test_times_out(engine):
    print("first", engine)

async def test_after_it(tmp_path):
    print("second", tmp_path)
"""


# A test that fails, then hangs in its teardown: pytest-timeout stops timing
# a test once its call has failed.
FAILS_THEN_HANGS = """
import asyncio
import pytest

@pytest.fixture
async def stuck():
    yield
    await asyncio.Event().wait()

async def test_fails_then_hangs(stuck):
    assert False, "failed"
"""


def run_pytest(
    tmp_path: Path,
    plugins: list[str],
    scenario: str,
    *,
    timeout_s: float = 120,
    grace_s: float = 60,
) -> subprocess.CompletedProcess[str]:
    project = tmp_path / "project"
    project.mkdir(parents=True)
    (project / "test_scenario.py").write_text(scenario)
    (project / "conftest.py").write_text(f"pytest_plugins = {plugins!r}\n")
    (project / "pytest.ini").write_text(
        "[pytest]\nasyncio_mode = auto\n"
        "asyncio_default_fixture_loop_scope = function\ntimeout = 2\n"
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-s",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:ensync",
            "--basetemp",
            str(tmp_path / "base"),
        ],
        cwd=project,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "ENSYNC_TEST_TIMEOUT_GRACE_S": str(grace_s),
        },
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def run_scenario(tmp_path: Path, plugins: list[str]) -> tuple[str, str, str]:
    done = run_pytest(tmp_path, plugins, SCENARIO)
    output = done.stdout + done.stderr
    first = re.search(r"first (\S+)", output)
    second = re.search(r"second (\S+)", output)
    assert first, output
    assert second, output
    return first[1], second[1], output


@pytest.mark.slow
def test_the_test_after_a_timeout_gets_a_fresh_tmp_path(tmp_path: Path) -> None:
    first, second, output = run_scenario(tmp_path / "ours", ["tests.support.timeouts"])
    assert first != second, output
    assert "Timeout (>2.0s) from pytest-timeout" in output
    # What the hung test was waiting for is printed.
    assert "asyncio tasks at the timeout" in output
    assert "in busy" in output


@pytest.mark.slow
def test_without_it_pytest_timeout_alone_hands_out_a_stale_tmp_path(tmp_path: Path) -> None:
    # Positive control: the scenario above does reproduce the failure.
    first, second, output = run_scenario(tmp_path / "alone", [])
    assert first == second, output


@pytest.mark.slow
def test_a_teardown_that_hangs_after_a_failure_ends_the_run(tmp_path: Path) -> None:
    done = run_pytest(
        tmp_path, ["tests.support.timeouts"], FAILS_THEN_HANGS, timeout_s=60, grace_s=2
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Timeout" in output
    assert "Stack of" in output  # every thread's stack, to find the hang
