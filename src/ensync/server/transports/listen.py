"""Why a listener could not bind, said the way an operator can act on it.

grpcio answers a failed bind with a bare ``RuntimeError`` ("Failed to bind"),
and asyncio's ``OSError`` names the address as a tuple. Both become one
``OSError`` that names the address, the reason, and the flag to change.
"""

from __future__ import annotations

import errno
import os
import socket

__all__ = ["ListenError", "bind_failure"]


class ListenError(OSError):
    """A listener could not bind its address (the message says why and what to do)."""


_REASONS = {
    errno.EADDRINUSE: "the address is in use (another engine, or another program, listens there)",
    errno.EACCES: "permission denied (ports below 1024 need privileges)",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address",
}


def bind_failure(what: str, flag: str, host: str, port: int, cause: BaseException) -> ListenError:
    """A `ListenError` for a listener (``what``, set by ``flag``) that failed to bind.

    The reason comes from ``cause`` when it carries an errno, otherwise from
    binding a plain socket to the same address (grpcio does not say why).

    >>> error = bind_failure("HTTP", "--http", "::1", 80, OSError(errno.EACCES, "denied"))
    >>> str(error).split(": ")[0], error.errno == errno.EACCES
    ('cannot listen for HTTP on [::1]:80', True)
    """
    code = cause.errno if isinstance(cause, OSError) and cause.errno else _probe(host, port)
    reason = (_REASONS.get(code) or os.strerror(code).lower()) if code else str(cause)
    shown = f"[{host}]" if ":" in host else host
    return ListenError(
        code or 0,
        f"cannot listen for {what} on {shown}:{port}: {reason}; choose another address with {flag}",
    )


def _probe(host: str, port: int) -> int | None:
    """The errno a plain bind of ``host:port`` fails with (``None``: it binds)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return errno.EADDRNOTAVAIL
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as probe:
            # As the listeners do: only a live listener, not TIME_WAIT, is in the way.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                return exc.errno
    return None
