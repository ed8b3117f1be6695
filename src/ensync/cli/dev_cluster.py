"""``ensync dev-cluster``: a NATS JetStream cluster and engine nodes on this
machine, to try ensync on more than one node in a minute.

It starts ``--nats`` NATS servers that replicate each other (JetStream with
``sync_interval: always``: a write is on disk on a quorum before it is
confirmed), then ``--nodes`` engine nodes over them on loopback ports,
registers the apps named with ``--app``, prints the URLs and the apps'
credentials, and stops everything on Ctrl-C (or SIGTERM). Killed hard, it
takes them along all the same (on Linux): each dies with its parent.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from ensync._loop import run as run_loop
from ensync.server.core.apps import AppRegistry, NewApp
from ensync.server.runtime.clock import wall_clock_ms
from ensync.server.store import StoreError, open_store
from ensync.testing.nats_server import NatsError, NatsServer, nats_cluster
from ensync.testing.process import EngineProcess, EngineProcessError

__all__ = ["ClusterInfo", "add_parser", "run"]


@dataclass(frozen=True, slots=True)
class ClusterInfo:
    """What ``dev-cluster`` started (``--json`` prints it)."""

    store: str
    nats: list[str]
    grpc: list[str]
    ws: list[str]
    apps: list[dict[str, str]]
    directory: str


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``dev-cluster`` on the ``ensync`` command parser."""
    parser = commands.add_parser(
        "dev-cluster",
        help="run NATS servers and engine nodes on this machine until Ctrl-C",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--nodes", type=int, default=2, help="engine nodes (2)")
    parser.add_argument("--nats", type=int, default=3, help="NATS servers, 1 or 3 or 5 (3)")
    parser.add_argument(
        "--app",
        action="append",
        default=None,
        metavar="NAME",
        help="register an app and print its keys (repeatable; default: one app named 'dev')",
    )
    parser.add_argument(
        "--dir",
        default=None,
        help="keep the cluster's files here (default: a temporary directory, deleted at exit)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object once everything runs"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Run the cluster until a signal; returns the exit code."""
    if args.nodes < 1:
        print("ensync dev-cluster: --nodes must be 1 or more", file=sys.stderr)
        return 2
    if args.nats not in (1, 3, 5):
        print("ensync dev-cluster: --nats must be 1, 3 or 5", file=sys.stderr)
        return 2
    names = args.app or ["dev"]
    try:
        return run_loop(_run(args, names))
    except BrokenPipeError:
        raise  # the reader of the output left: the entry point ends quietly
    except (NatsError, EngineProcessError, StoreError, ValueError, OSError) as exc:
        print(f"ensync dev-cluster: {exc}", file=sys.stderr)
        return 1


async def _run(args: argparse.Namespace, names: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with _directory(args.dir) as root:
        print(f"starting {args.nats} NATS servers in {root} ...", file=sys.stderr)
        async with nats_cluster(root / "nats", size=args.nats, sync="always") as servers:
            store = _store_url(servers)
            apps = await _register(store, root, names)
            print(f"starting {args.nodes} engine nodes ...", file=sys.stderr)
            async with _nodes(root, store, args.nodes) as nodes:
                info = ClusterInfo(
                    store=store,
                    nats=[server.url for server in servers],
                    grpc=[node.grpc_url for node in nodes],
                    ws=[node.ws_url for node in nodes],
                    apps=[
                        {
                            "name": app.name,
                            "app_key": app.app_key,
                            "app_id": app.app_id,
                            "secret_key": app.secret_key,
                        }
                        for app in apps
                    ],
                    directory=str(root),
                )
                if args.json:
                    print(json.dumps(asdict(info)), flush=True)
                else:
                    _describe(info)
                await stop.wait()
                print("stopping ...", file=sys.stderr)
    return 0


@contextlib.contextmanager
def _directory(chosen: str | None) -> Iterator[Path]:
    if chosen is not None:
        path = Path(chosen)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="ensync-dev-cluster-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _store_url(servers: list[NatsServer]) -> str:
    replicas = min(len(servers), 3)
    return ",".join(server.url for server in servers) + f"?replicas={replicas}"


async def _register(store_url: str, root: Path, names: list[str]) -> list[NewApp]:
    store = open_store(store_url, root, serve=False)
    await store.open()
    try:
        registry = AppRegistry(store, wall_clock_ms, cache_ms=0)
        apps = []
        for name in names:
            existing = await store.get_app_by_name(name)
            if existing is not None:
                # A kept --dir: the app is there, its secret key was printed before.
                print(f"app {name!r} exists already (its keys were printed when made)")
                continue
            apps.append(await registry.create(name))
        return apps
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def _nodes(root: Path, store_url: str, count: int) -> AsyncIterator[list[EngineProcess]]:
    nodes = [
        EngineProcess(
            root / f"node-{index + 1}",
            serve_args=["--store", store_url, "--log-level", "INFO"],
            log_name="engine.log",
        )
        for index in range(count)
    ]
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        yield nodes
    finally:
        for node in nodes:
            if node.running:
                with contextlib.suppress(EngineProcessError):
                    await node.terminate()
            await node.close()


def _describe(info: ClusterInfo) -> None:
    out = sys.stdout
    print("ensync dev-cluster is running; Ctrl-C stops it.\n", file=out)
    print(f"NATS servers:  {', '.join(info.nats)}", file=out)
    print(f"store URL:     {info.store}", file=out)
    for index, (grpc, ws) in enumerate(zip(info.grpc, info.ws, strict=True), 1):
        print(f"engine node {index}: {grpc}  {ws}", file=out)
    for app in info.apps:
        print(f"\napp:        {app['name']}", file=out)
        print(f"app key:    {app['app_key']}", file=out)
        print(f"app id:     {app['app_id']}", file=out)
        print(f"secret key: {app['secret_key']}", file=out)
    urls = ", ".join(repr(url) for url in info.grpc)
    print(f"\nIn Python:  EnSyncEngine([{urls}])", file=out)
    print(f"Commands:   ensync app create NAME --store '{info.store}'", file=out)
    print(f"Logs:       {info.directory}/node-*/engine.log, {info.directory}/nats/", file=out)
    out.flush()
