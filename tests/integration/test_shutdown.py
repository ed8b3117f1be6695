"""SIGTERM on the engine process: finish what is in progress, lose nothing."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ensync import EnSyncEngine, Message
from ensync.crypto import seal
from tests.support.cli import ensync, free_port, start_serve
from tests.support.timing import eventually, seconds


async def test_sigterm_finishes_commits_and_requeues_in_flight(tmp_path: Path) -> None:
    import json

    data = tmp_path / "data"
    grpc_port, http_port = free_port(), free_port()
    alice = json.loads(ensync("app", "create", "alice", "--data", str(data), "--json").stdout)
    bob = json.loads(ensync("app", "create", "bob", "--data", str(data), "--json").stdout)
    process = await start_serve(data, grpc_port, http_port, "--ack-deadline-ms", "60000")
    receiver = EnSyncEngine(f"grpc://127.0.0.1:{grpc_port}", max_reconnect_attempts=1)
    try:
        # A subscriber holds one message in flight, unacked.
        client = await receiver.create_client(bob["app_key"], app_secret_key=bob["secret_key"])
        held: list[Message] = []
        sub = await client.subscribe("held", auto_ack=False)
        sub.on(held.append)
        ws = await connect(f"ws://127.0.0.1:{http_port}/message")
        await ws.send(f"CONN;ACCESS_KEY=:{alice['app_key']}")
        reply = str(await ws.recv())
        client_id = reply.split("clientId=", 1)[1].split(",", 1)[0]
        payload = seal(b'{"n":1}', bob["app_id"])
        await ws.send(
            f"PUB;CLIENT_ID=:{client_id};EVENT_NAME=:held;PAYLOAD=:{payload}"
            f";DELIVERY_TO=:{bob['app_id']};METADATA=:{{}}"
        )
        in_flight = str(await ws.recv()).removeprefix("+PASS:")
        await eventually(lambda: len(held) == 1)
        assert held[0].idem == in_flight

        # Pipeline many publishes and stop the engine while they are in progress.
        total = 2000
        for _ in range(total):
            await ws.send(
                f"PUB;CLIENT_ID=:{client_id};EVENT_NAME=:bulk;PAYLOAD=:{payload}"
                f";DELIVERY_TO=:{bob['app_id']};METADATA=:{{}}"
            )
        confirmed: list[str] = []
        refused: list[str] = []
        close_code = None
        try:
            while True:
                frame = str(await asyncio.wait_for(ws.recv(), seconds(10)))
                if frame.startswith("+PASS:"):
                    confirmed.append(frame.removeprefix("+PASS:"))
                    if len(confirmed) == 50:
                        process.send_signal(signal.SIGTERM)  # mid-stream
                else:
                    refused.append(frame)
        except ConnectionClosed as closed:
            close_code = closed.rcvd.code if closed.rcvd else None
        assert close_code == 1001
        # Commands the engine had taken were finished and answered; those that
        # came after the signal were refused; unread ones were never taken
        # (the SDK retries those with their idempotency key).
        assert all(frame == "-FAIL:the engine is shutting down" for frame in refused)
        assert len(confirmed) >= 50
        assert len(confirmed) + len(refused) <= total
        assert await asyncio.wait_for(process.wait(), seconds(15)) == 0
    finally:
        await receiver.close()
        if process.returncode is None:
            process.kill()
            await process.wait()

    # Every publish the engine confirmed is on disk; the database is sound.
    db = sqlite3.connect(f"file:{data / 'ensync.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = {row[0] for row in db.execute("SELECT idem FROM messages")}
    finally:
        db.close()
    assert set(confirmed) <= stored
    assert in_flight in stored

    # The message that was in flight comes back after the restart.
    process = await start_serve(data, grpc_port, http_port, "--ack-deadline-ms", "60000")
    receiver = EnSyncEngine(f"grpc://127.0.0.1:{grpc_port}")
    try:
        client = await receiver.create_client(bob["app_key"], app_secret_key=bob["secret_key"])
        again: list[Message] = []
        (await client.subscribe("held")).on(again.append)
        await eventually(lambda: [m.idem for m in again] == [in_flight], timeout_s=10)
    finally:
        await receiver.close()
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), seconds(15))
