"""Random bytes from the OS, fetched a few kilobytes at a time.

Ids, idempotency keys and envelope nonces are made per message; one
``os.urandom`` system call per ~170 of them instead of one each. A forked child drops what it
inherited, so parent and child never hand out the same bytes.

:class:`EntropyBuffer` is the same buffer over another source: the crypto
package refills its nonces through libsodium, which keeps the GIL where
``os.urandom`` lets go of it (ensync.crypto._sodium says why).
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

__all__ = ["EntropyBuffer", "random_bytes", "random_token"]


class EntropyBuffer:
    """Random bytes handed out from ``chunk``-sized refills of ``fill``.

    ``fill(n)`` must return ``n`` bytes from a CSPRNG. Whoever makes one
    registers its :meth:`forget` to run in a forked child
    (``os.register_at_fork``).
    """

    def __init__(self, chunk: int = 4096, fill: Callable[[int], bytes] = os.urandom) -> None:
        self._chunk = chunk
        self._fill = fill
        self._buffer = b""
        self._at = 0

    def take(self, count: int) -> bytes:
        """``count`` bytes never handed out before."""
        if count > self._chunk:
            return self._fill(count)
        if self._at + count > len(self._buffer):
            self._buffer = self._fill(self._chunk)
            self._at = 0
        start = self._at
        self._at = start + count
        return self._buffer[start : self._at]

    def forget(self) -> None:
        """Drop the buffered bytes (in a forked child: the parent's)."""
        self._buffer = b""
        self._at = 0


_entropy = EntropyBuffer()
os.register_at_fork(after_in_child=_entropy.forget)


def random_bytes(count: int) -> bytes:
    """``count`` bytes from the OS's CSPRNG (as ``os.urandom``).

    >>> len(random_bytes(10))
    10
    """
    return _entropy.take(count)


def random_token(count: int = 16) -> str:
    """``count`` random bytes as unpadded URL-safe base64 (as ``secrets.token_urlsafe``).

    >>> len(random_token(16))
    22
    """
    return base64.urlsafe_b64encode(_entropy.take(count)).rstrip(b"=").decode("ascii")
