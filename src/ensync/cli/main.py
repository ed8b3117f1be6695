"""``ensync``: run the engine, manage apps, make keys, benchmark.

Every option can also come from an ``ENSYNC_*`` environment variable named
after it (``--data`` → ``ENSYNC_DATA``, ``--ack-deadline-ms`` →
``ENSYNC_ACK_DEADLINE_MS``); a flag on the command line wins.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from ensync._version import __version__
from ensync.cli import apps, client_verbs, dlq, serve

__all__ = ["build_parser", "main"]


def env(name: str, default: str) -> str:
    """The value of ``ENSYNC_<NAME>``, else ``default``."""
    return os.environ.get("ENSYNC_" + name.upper().replace("-", "_"), default)


def env_int(name: str, default: int) -> int:
    raw = env(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise SystemExit(f"ensync: ENSYNC_{name.upper()} must be an integer, not {raw!r}") from None


def add_data_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data", default=env("data", ".ensync"), help="data directory (default: %(default)s)"
    )
    parser.add_argument(
        "--store",
        default=env("store", "sqlite:"),
        help="store URL: sqlite: (DATA/ensync.db), sqlite:PATH, memory:, or"
        " nats://HOST:PORT[,nats://HOST:PORT...][?replicas=3] for engine nodes"
        " sharing a NATS JetStream cluster (default: %(default)s)",
    )
    parser.add_argument(
        "--nats-creds",
        default=env("nats_creds", "") or None,
        metavar="FILE",
        help="NATS credentials file (nats:// stores)",
    )
    parser.add_argument(
        "--nats-tls-ca",
        default=env("nats_tls_ca", "") or None,
        metavar="FILE",
        help="CA bundle that verifies the NATS servers (tls:// stores)",
    )


class _ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Every default in the help, except "None" for options that are off."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ensync", description="The ensync engine and tools. Options also read ENSYNC_* env."
    )
    parser.add_argument("--version", action="version", version=f"ensync {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve_cmd = commands.add_parser(
        "serve",
        help="run the engine",
        description="Run the engine until Ctrl-C or SIGTERM.",
        formatter_class=_ShowDefaults,
    )
    add_data_options(serve_cmd)
    serve.add_arguments(serve_cmd, env, env_int)
    serve_cmd.set_defaults(run=serve.run)

    app_cmd = commands.add_parser("app", help="register, list and revoke apps")
    app_commands = app_cmd.add_subparsers(dest="app_command", required=True, metavar="ACTION")
    create = app_commands.add_parser("create", help="register an app and print its keys once")
    create.add_argument("name")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_options(create)
    create.set_defaults(run=apps.create)
    listing = app_commands.add_parser("list", help="list registered apps")
    listing.add_argument("--json", action="store_true", help="print JSON")
    add_data_options(listing)
    listing.set_defaults(run=apps.list_apps)
    revoke = app_commands.add_parser("revoke", help="revoke an app's key (its clients are cut off)")
    revoke.add_argument("name")
    add_data_options(revoke)
    revoke.set_defaults(run=apps.revoke)
    rotate = app_commands.add_parser(
        "rotate-key", help="give an app a new app key and print it once; the old one stops"
    )
    rotate.add_argument("name")
    rotate.add_argument("--json", action="store_true", help="print one JSON object")
    add_data_options(rotate)
    rotate.set_defaults(run=apps.rotate_key)
    allow = app_commands.add_parser(
        "allow",
        help="set which message names an app may publish and subscribe to",
        description="Patterns: segments separated by '/', '*' = one segment, a final '#' = "
        "any rest ('#' alone: every name, the default). Each option replaces that list.",
    )
    allow.add_argument("name")
    allow.add_argument("--publish", nargs="+", metavar="PATTERN", help="names it may publish")
    allow.add_argument(
        "--subscribe", nargs="+", metavar="PATTERN", help="names it may subscribe to"
    )
    add_data_options(allow)
    allow.set_defaults(run=apps.allow)

    client_verbs.add_publish(commands, env)
    client_verbs.add_tail(commands, env)
    client_verbs.add_replay(commands, env)
    dlq.add_dlq(commands, add_data_options)

    keygen = commands.add_parser("keygen", help="print a new Ed25519 key pair")
    keygen.add_argument("--json", action="store_true", help="print one JSON object")
    keygen.set_defaults(run=apps.keygen)

    from ensync.cli import bench, dev_cluster

    bench.add_parser(commands)
    dev_cluster.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ensync`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code: int = args.run(args)
        # A reader that left (`ensync dlq list | head -1`) shows here, not in
        # the interpreter's flush at exit, where it could not be caught.
        sys.stdout.flush()
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return _reader_gone()
    return code


def _reader_gone() -> int:
    """End quietly, as a tool that SIGPIPE stopped: what is still buffered
    goes to /dev/null, so the flush at exit cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 128 + signal.SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
