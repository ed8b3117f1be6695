"""A listener whose address is taken: the engine refuses to start, saying so."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ensync.server.config import ServerConfig
from ensync.server.serving import running_server
from ensync.server.transports.listen import ListenError
from ensync.testing import run_engine
from tests.support.cli import ensync, free_port


def _config(tmp_path: Path, grpc_port: int = 0, http_port: int = 0) -> ServerConfig:
    return ServerConfig(
        data_dir=tmp_path,
        grpc_address=f"127.0.0.1:{grpc_port}",
        http_address=f"127.0.0.1:{http_port}",
        store_url="memory:",
    )


async def test_a_second_engine_on_a_taken_grpc_port_is_refused(tmp_path: Path) -> None:
    async with run_engine() as first:
        with pytest.raises(ListenError) as refused:
            async with running_server(_config(tmp_path, grpc_port=first.grpc_port)):
                pass
    text = str(refused.value)
    assert f"gRPC on 127.0.0.1:{first.grpc_port}" in text
    assert "in use" in text
    assert "--grpc" in text


async def test_a_taken_http_port_is_refused(tmp_path: Path) -> None:
    async with run_engine() as first:
        with pytest.raises(ListenError) as refused:
            async with running_server(_config(tmp_path, http_port=first.http_port)):
                pass
    text = str(refused.value)
    assert f"HTTP on 127.0.0.1:{first.http_port}" in text
    assert "in use" in text
    assert "--http" in text


async def test_ensync_serve_on_a_taken_port_exits_with_the_reason(tmp_path: Path) -> None:
    async with run_engine() as first:
        result = await asyncio.to_thread(
            ensync,
            "serve",
            "--data",
            str(tmp_path),
            "--grpc",
            f"127.0.0.1:{first.grpc_port}",
            "--http",
            f"127.0.0.1:{free_port()}",
        )
    assert result.returncode == 1
    assert f"cannot listen for gRPC on 127.0.0.1:{first.grpc_port}" in result.stderr
    assert "Traceback" not in result.stderr
