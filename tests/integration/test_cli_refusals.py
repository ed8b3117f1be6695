"""The command line refuses a user's mistake with a message, never a
traceback: a data directory that cannot be written or holds no store, and a
reader that closed its end of the pipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ensync import EnSyncEngine
from ensync.testing import run_engine
from tests.support.cli import ensync
from tests.support.timing import seconds


def closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """``ensync ARGS`` writing to a pipe whose reader is gone, as in
    ``ensync dlq list | head -1`` once ``head`` has its line."""
    read, write = os.pipe()
    os.close(read)  # before the command writes anything: every write fails
    try:
        return subprocess.run(
            [sys.executable, "-m", "ensync.cli.main", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=seconds(60),
            check=False,
        )
    finally:
        os.close(write)


@pytest.fixture
async def dead_letter(tmp_path: Path) -> tuple[Path, str]:
    """A data directory holding one dead letter, and its idem."""
    data = tmp_path / "data"
    async with run_engine(store="sqlite:", data_dir=data) as server:
        app = await server.create_app("warehouse")
        sdk = EnSyncEngine(server.grpc_url)
        try:
            client = await sdk.create_client(app.app_key, app_secret_key=app.secret_key)
            sub = await client.subscribe("orders/created", auto_ack=False)
            idem = await client.publish("orders/created", [app.app_id], {"id": 7})
            async for message in sub:
                await sub.discard(message.idem, "no such order")
                break
        finally:
            await sdk.close()
    return data, idem


def test_a_closed_pipe_ends_a_command_quietly(dead_letter: tuple[Path, str]) -> None:
    data, idem = dead_letter
    for args in (
        ("dlq", "list", "--data", str(data)),
        ("dlq", "show", idem, "--data", str(data)),
        ("app", "list", "--data", str(data)),
        ("keygen",),
    ):
        done = closed_stdout(*args)
        # As a shell reports any tool that a closed pipe stopped: 128 + SIGPIPE.
        assert (done.returncode, done.stderr) == (128 + signal.SIGPIPE, ""), args


def test_a_data_directory_that_cannot_be_written_is_named(tmp_path: Path) -> None:
    # Root may write anywhere, but not below a regular file.
    blocker = tmp_path / "file"
    blocker.write_text("")
    data = blocker / "data"
    created = ensync("app", "create", "orders", "--data", str(data))
    assert created.returncode == 1
    assert "Traceback" not in created.stderr
    assert f"cannot open sqlite store {data / 'ensync.db'}" in created.stderr
    assert "Not a directory" in created.stderr
    # The real failure alone: no note that no engine serves the directory.
    assert "no engine is serving" not in created.stderr
    served = ensync("serve", "--data", str(data), "--grpc", "127.0.0.1:0", "--http", "127.0.0.1:0")
    assert served.returncode == 1
    assert "Traceback" not in served.stderr
    assert str(data) in served.stderr


@pytest.mark.parametrize(
    "command",
    [
        ("app", "list"),
        ("app", "revoke", "orders"),
        ("app", "rotate-key", "orders"),
        ("app", "allow", "orders", "--publish", "orders/#"),
        ("dlq", "list"),
        ("dlq", "show", "01M98S6H1KAKBRHCYV6RP2V68E"),
        ("dlq", "redrive"),
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_a_directory_without_a_store_is_refused(command: tuple[str, ...], tmp_path: Path) -> None:
    for data in (tmp_path / "mistyped", tmp_path):  # missing, and there but empty
        refused = ensync(*command, "--data", str(data))
        assert refused.returncode == 1, refused.stderr
        assert f"no ensync store in {data}" in refused.stderr
        assert f"ensync app create NAME --data {data}" in refused.stderr
        assert "Traceback" not in refused.stderr
        assert refused.stdout == ""
    assert not (tmp_path / "mistyped").exists()  # nothing was created
    assert list(tmp_path.iterdir()) == []


def test_app_create_makes_the_store_the_others_then_use(tmp_path: Path) -> None:
    data = tmp_path / "new"
    created = ensync("app", "create", "orders", "--data", str(data), "--json")
    assert created.returncode == 0, created.stderr
    listed = ensync("app", "list", "--json", "--data", str(data))
    assert listed.returncode == 0, listed.stderr
    assert [row["name"] for row in json.loads(listed.stdout)] == ["orders"]
    assert ensync("dlq", "list", "--data", str(data)).returncode == 0
