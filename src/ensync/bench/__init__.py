"""The benchmark programs of ``ensync bench``, each a program of its own.

Throughput (:mod:`ensync.bench.throughput`), a deep backlog
(:mod:`ensync.bench.backlog`), a soak (:mod:`ensync.bench.soak`), ensync
beside NATS JetStream (:mod:`ensync.bench.compare`), the engine on each
of its stores (:mod:`ensync.bench.stores`) and sealing beside a busy
thread (:mod:`ensync.bench.threads`). ``ensync bench``
(:mod:`ensync.cli.bench`) parses the command line and hands the options to
one program's ``run``; each program but the last starts the engine as a
process of its own and drives it through the public SDK.
"""

__all__: list[str] = []
