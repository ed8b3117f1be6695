"""One engine per data directory, and the directory private to its user."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest

from ensync.server.datadir import DataDirInUseError, engine_holding
from ensync.testing import run_engine


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_a_new_data_directory_is_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    async with run_engine("sqlite:", data) as server:
        await server.create_app("orders")  # a write: the WAL exists now
        assert mode(data) == 0o700
        for name in ("ensync.db", "ensync.db-wal", "ensync.db-shm", "ensync.db.lock"):
            assert mode(data / name) == 0o600, name


async def test_an_engine_warns_about_a_directory_others_can_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # whatever the umask
    with caplog.at_level(logging.WARNING, logger="ensync.server.serving"):
        async with run_engine("sqlite:", data):
            pass
    warned = [r.getMessage() for r in caplog.records if "other users can read" in r.getMessage()]
    assert warned == [f"{data} is mode 0755: other users can read it (chmod go= to fix)"]
    # Positive control: a private directory gets no warning.
    caplog.clear()
    os.chmod(data, 0o700)
    with caplog.at_level(logging.WARNING, logger="ensync.server.serving"):
        async with run_engine("sqlite:", data):
            pass
    assert not [r for r in caplog.records if "other users can read" in r.getMessage()]


async def test_one_engine_per_directory_and_the_lock_goes_with_the_engine(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    database = data / "ensync.db"
    assert engine_holding(database) is None
    async with run_engine("sqlite:", data):
        assert engine_holding(database) == str(os.getpid())
        with pytest.raises(DataDirInUseError, match=f"pid {os.getpid()}.*{database}"):
            async with run_engine("sqlite:", data):
                pass
    assert engine_holding(database) is None
    async with run_engine("sqlite:", data):  # free again once the first stopped
        pass


async def test_memory_engines_take_no_lock(tmp_path: Path) -> None:
    async with run_engine("memory:", tmp_path), run_engine("memory:", tmp_path):
        pass
