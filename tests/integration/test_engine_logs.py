"""The engine logs its refusals: each kind at most once a second, with a count."""

from __future__ import annotations

import asyncio
import logging

import pytest

from ensync import EnSyncAuthError, EnSyncEngine, EnSyncPublishError
from ensync.testing import run_engine


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and record.getMessage().startswith("refused (")
    ]


async def test_refusals_are_logged_once_a_second_per_kind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="ensync.server.core")
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
