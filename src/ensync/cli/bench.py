"""``ensync bench``: end-to-end throughput and latency on this machine.

The engine runs as its own process (``ensync serve`` on a temporary data
directory, sqlite store), so it has a core of its own; the publisher and the
subscriber run in this process. Every message is a ~1 KB JSON payload,
published with ``persist: true``, encrypted for the recipient, decrypted and
acked by the subscriber. Latency is publish-call start to handler entry.

The CPU time used by the engine and by the clients is reported beside the
figures: a component using less than a whole core while the other is
saturated is not the bottleneck.

More programs share the command:

* ``--backlog N``: engine memory and publish throughput with N pending
  messages, and memory under a consumer slower than the publishers
  (see :mod:`ensync.bench.backlog`);
* ``--soak MINUTES``: a mixed load with every verb and reconnecting
  clients, watching the engine's memory and open files
  (see :mod:`ensync.bench.soak`);
* ``--compare jetstream``: ensync beside NATS JetStream, publisher and
  subscriber in processes of their own (see :mod:`ensync.bench.compare`);
* ``--threads``: sealing and opening alone and beside a busy Python thread,
  ensync's GIL-keeping libsodium calls beside PyNaCl's, no engine
  (see :mod:`ensync.bench.threads`).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ensync.bench import backlog, compare, soak, stores, threads, throughput

__all__ = ["add_parser", "run"]

DEFAULT_MESSAGES = 10_000


def add_parser(commands: Any) -> None:
    """Register ``bench`` on the ``ensync`` command parser."""
    bench = commands.add_parser(
        "bench",
        help="measure end-to-end throughput and latency (engine in its own process)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_argument(
        "--messages",
        type=int,
        default=None,
        help="messages to send (10000); with --backlog: per throughput round;"
        f" with --compare: per throughput run ({compare.DEFAULT_MESSAGES});"
        f" with --threads: calls per figure ({threads.DEFAULT_CALLS})",
    )
    bench.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds to take medians of, with --backlog and --compare (3)",
    )
    bench.add_argument("--rate", type=float, default=0, help="messages/s; 0 = as fast as possible")
    bench.add_argument("--payload-bytes", type=int, default=1024, help="JSON payload size (1024)")
    bench.add_argument(
        "--concurrency", type=int, default=64, help="most publishes in flight at once (64)"
    )
    bench.add_argument(
        "--transport", choices=["grpc", "ws"], default="grpc", help="wire protocol (grpc)"
    )
    bench.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    bench.add_argument(
        "--store",
        default=None,
        metavar="URL",
        help="the engine's store: sqlite (the default), 'nats' (a NATS JetStream server"
        " started for the run), 'nats-cluster' (three, replicating each other, fsyncing"
        " every write, as ensync dev-cluster runs them) or nats://HOST:PORT (yours; the"
        " bench uses a namespace of its own and deletes it afterwards)",
    )
    bench.add_argument(
        "--nodes",
        type=int,
        default=1,
        help="engine nodes over a nats store: the publisher uses the first, the"
        " subscriber the last (1)",
    )
    program = bench.add_mutually_exclusive_group()
    program.add_argument(
        "--backlog",
        type=int,
        nargs="?",
        const=backlog.DEFAULT_BACKLOG,
        metavar="N",
        help=f"deep-backlog program with N pending messages ({backlog.DEFAULT_BACKLOG})",
    )
    program.add_argument(
        "--soak", type=float, metavar="MINUTES", help="mixed-load soak for MINUTES (may be 0.5)"
    )
    program.add_argument(
        "--compare",
        choices=["jetstream", "stores"],
        help="jetstream: ensync beside NATS JetStream, same machine, same run (needs"
        " ensync[bench]); stores: the engine on sqlite, on one NATS server, on three"
        " (replicas 3) and as two nodes on three, same run",
    )
    program.add_argument(
        "--threads",
        action="store_true",
        help="seal and open --payload-bytes alone and beside a busy Python thread,"
        " ensync's GIL-keeping libsodium calls beside PyNaCl's (no engine)",
    )
    _add_backlog_options(bench)
    _add_soak_options(bench)
    _add_compare_options(bench)
    bench.set_defaults(run=run)


def _add_backlog_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--backlog options")
    group.add_argument(
        "--backlog-fill",
        choices=["store", "engine"],
        default="store",
        help="write the backlog into the store before the engine starts (store, fast)"
        " or publish it through an engine (engine, slow)",
    )
    group.add_argument(
        "--backlog-partitions", type=int, default=2, help="partitions of the backlog (2)"
    )
    group.add_argument(
        "--slow-seconds",
        type=float,
        default=60.0,
        help="length of the slow-consumer phase; 0 skips it (60)",
    )
    group.add_argument(
        "--slow-handler-ms",
        type=float,
        default=10.0,
        help="the slow subscriber's handler sleeps this long per message (10)",
    )


def _add_soak_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--soak options")
    group.add_argument(
        "--soak-rate",
        type=float,
        default=soak.DEFAULT_SOAK_RATE,
        help=f"messages/s published in all ({soak.DEFAULT_SOAK_RATE:g})",
    )
    group.add_argument(
        "--churn-seconds",
        type=float,
        default=0,
        help="clients restarted and links cut this often (default: 20 s, less for short soaks)",
    )
    group.add_argument(
        "--soak-ack-deadline-ms",
        type=int,
        default=3_000,
        help="the engine's ack deadline during the soak (3000)",
    )
    group.add_argument(
        "--soak-drain-seconds",
        type=float,
        default=360.0,
        help="after the load, wait this long at most for every message to be settled;"
        " covers the engine's longest redelivery backoff (360)",
    )
    group.add_argument(
        "--soak-session-timeout-ms",
        type=int,
        default=5_000,
        help="the engine's session timeout during the soak, so that the sessions of"
        " closed gRPC clients are gone before the end (5000)",
    )


def _add_compare_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("--compare options")
    group.add_argument(
        "--latency-messages",
        type=int,
        default=compare.DEFAULT_LATENCY_MESSAGES,
        help=f"messages per latency run, at 1,000/s ({compare.DEFAULT_LATENCY_MESSAGES})",
    )


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the flags chose and print its figures; returns the exit code."""
    if args.messages is None and args.threads:
        args.messages = threads.DEFAULT_CALLS
    if args.compare is None and args.messages is None:
        args.messages = DEFAULT_MESSAGES
    problem = _argument_problem(args)
    if problem is not None:
        print(f"ensync bench: {problem}", file=sys.stderr)
        return 2
    if args.threads:
        return threads.run(args)
    if args.compare == "stores":
        return stores.run(args)
    if args.compare == "jetstream":
        return compare.run(args)
    if args.backlog is not None:
        return backlog.run(args)
    if args.soak is not None:
        return soak.run(args)
    return throughput.run(args)


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What is wrong with the flags, said as ``ensync bench: ...`` says it; ``None``: nothing."""
    if args.compare is not None:
        if (args.messages is not None and args.messages <= 0) or args.payload_bytes <= 0:
            return "--messages and --payload-bytes must be positive"
        if args.compare == "stores":
            return "--rounds must be positive" if args.rounds <= 0 else None
        if args.latency_messages <= 0 or args.rounds <= 0:
            return "--latency-messages and --rounds must be positive"
        return None
    for name in ("messages", "payload_bytes", "concurrency", "rounds"):
        if getattr(args, name) <= 0:
            return f"--{name.replace('_', '-')} must be positive"
    if args.rate < 0:
        return "--rate must be 0 or more"
    if args.store is not None and (
        args.backlog is not None or args.soak is not None or args.threads
    ):
        return "--store goes with the throughput program only"
    if args.nodes < 1 or (args.nodes > 1 and not str(args.store).startswith("nats")):
        return "--nodes above 1 needs a nats store (--store nats)"
    if args.backlog is not None:
        return _backlog_problem(args)
    if args.soak is not None:
        return _soak_problem(args)
    return None


def _backlog_problem(args: argparse.Namespace) -> str | None:
    checks = [
        (args.backlog >= 1, "--backlog must be positive"),
        (args.backlog_partitions >= 1, "--backlog-partitions must be positive"),
        (args.rounds >= 1, "--rounds must be positive"),
        (args.slow_seconds >= 0, "--slow-seconds must be 0 or more"),
        (args.slow_handler_ms >= 0, "--slow-handler-ms must be 0 or more"),
    ]
    return next((problem for ok, problem in checks if not ok), None)


def _soak_problem(args: argparse.Namespace) -> str | None:
    if args.soak <= 0 or args.soak_rate <= 0 or args.churn_seconds < 0:
        return "--soak and --soak-rate must be positive"
    if (
        args.soak_ack_deadline_ms <= 0
        or args.soak_session_timeout_ms <= 0
        or args.soak_drain_seconds < 0
    ):
        return "the --soak-* options must be positive"
    return None
