"""How logs on both sides name a client without revealing its id."""

from __future__ import annotations

import hashlib

__all__ = ["client_tag"]


def client_tag(client_id: str) -> str:
    """A short hash of a client id, for logs.

    The id is a bearer credential (PROTOCOL.md §1): logs never carry it, nor
    a prefix of it, which would narrow a guess.

    >>> len(client_tag("abc"))
    8
    """
    return hashlib.blake2b(client_id.encode("utf-8"), digest_size=4).hexdigest()
