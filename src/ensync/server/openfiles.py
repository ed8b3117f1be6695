"""The engine's open-files budget, and connection caps that fit in it.

Every connection holds a file descriptor. An engine that runs out of them
cannot accept its own clients, open its store or write its log, so its
listeners stop taking connections well before that: the gRPC listener and
the HTTP listeners each take at most ``max_connections``, and
`connection_budget` picks a default for it that leaves room for the rest.
"""

from __future__ import annotations

import contextlib
import resource

__all__ = [
    "RESERVED_FILES",
    "caps_fit",
    "connection_budget",
    "max_connections",
    "open_files_limit",
    "raise_open_files_limit",
]

# Descriptors kept out of the connection budget: the store's files and
# sockets, the log, the event loop's and grpc's own, pipes, the admin side.
RESERVED_FILES = 128


def open_files_limit() -> int:
    """The soft limit on open files this process runs with."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the
    limit in force (unchanged when the system refuses)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != soft:
        # A platform that caps it lower refuses: keep what there is.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return open_files_limit()


def connection_budget(limit: int) -> int:
    """The default ``max_connections`` for an open-files ``limit``: a third of
    what is left after `RESERVED_FILES` for each of the gRPC and HTTP
    listeners, and the last third for connections being refused (a refusal
    holds a descriptor for a moment: accepted, then closed). Without that
    room a flood runs the process out of descriptors, and then a listener
    stops accepting, refusals included.

    >>> connection_budget(1024), connection_budget(1_048_576)
    (298, 349482)
    """
    return max(16, (limit - RESERVED_FILES) // 3)


def max_connections(configured: int) -> int:
    """``configured``, or (0) the budget of this process's open-files limit."""
    return configured or connection_budget(open_files_limit())


def caps_fit(max_connections: int, limit: int) -> bool:
    """Whether both listeners full to ``max_connections`` leave the reserve
    and room to refuse as many again."""
    return 3 * max_connections + RESERVED_FILES <= limit
