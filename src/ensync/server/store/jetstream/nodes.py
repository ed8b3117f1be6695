"""Which engine nodes are alive: each announces itself under a key that lapses.

A node writes ``<prefix>.node.<id>`` (what it is: address, version, start
time) with a per-message time to live and rewrites it before the time is
up; the server drops the record of a node that stopped. Every node reads
the live set from these records: the slot plan (:func:`ensync.server.core.
ownership.plan`) balances over it, an owner gives back the leases of
clients whose node left, and the console lists it.

Announcing expects no record under the id: a second node started with the
id of a live one is refused, rather than both renewing one record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from ensync.server.store.base import StoreError
from ensync.server.store.jetstream.api import ROLLUP, ConflictError, JetStreamApi, Out

__all__ = ["NodeIdInUseError", "NodeRegistry"]


class NodeIdInUseError(StoreError):
    """A live node already announced itself under this id."""


class NodeRegistry:
    """One node's record among the live nodes.

    Args:
        api: an open JetStream API.
        stream: holds ``<prefix>.node.*`` (the ownership stream,
            :func:`~ensync.server.store.jetstream.slots.owned_stream_config`:
            each write rolls its subject up to one message).
        prefix: the subjects' prefix.
        node: this node's id (``[A-Za-z0-9_-]``).
        ttl_s: how long the server keeps a record after its last write.
    """

    def __init__(self, api: JetStreamApi, stream: str, prefix: str, node: str, ttl_s: int) -> None:
        if ttl_s < 1:
            raise ValueError("a record lives at least a second")
        if not node or not all(c.isalnum() or c in "_-" for c in node):
            raise ValueError(f"a node id is letters, digits, '_' and '-', not {node!r}")
        self._api = api
        self._stream = stream
        self._prefix = prefix
        self.node = node
        self._ttl_s = ttl_s
        self._seq: int | None = None
        self._record = b"{}"

    @property
    def _subject(self) -> str:
        return f"{self._prefix}.node.{self.node}"

    async def announce(self, info: Mapping[str, Any]) -> None:
        """Join the live nodes with ``info``.

        Raises:
            NodeIdInUseError: a live node has this id.
        """
        self._record = orjson.dumps({"node": self.node, **info})
        try:
            self._seq = await self._api.atomic(
                [Out(self._subject, self._record, expect=0, ttl_s=self._ttl_s, headers=ROLLUP)]
            )
        except ConflictError:
            raise NodeIdInUseError(
                f"node id {self.node!r} is in use by a live engine node: give this node"
                " another id, or wait for that one's record to lapse"
                f" ({self._ttl_s} s after it stopped)"
            ) from None

    async def renew(self) -> bool:
        """Stay among the live nodes; False if the record lapsed meanwhile (announce again)."""
        if self._seq is None:
            return False
        try:
            self._seq = await self._api.atomic(
                [
                    Out(
                        self._subject,
                        self._record,
                        expect=self._seq,
                        ttl_s=self._ttl_s,
                        headers=ROLLUP,
                    )
                ]
            )
        except ConflictError:
            self._seq = None
            return False
        return True

    async def leave(self) -> None:
        """Leave the live nodes at once (a clean stop)."""
        if self._seq is not None:
            await self._api.delete(self._stream, self._seq)
            self._seq = None

    async def live(self) -> dict[str, dict[str, Any]]:
        """Every live node's record, by id."""
        got = await self._api.get_last(self._stream, [f"{self._prefix}.node.*"])
        return {message.subject.rsplit(".", 1)[1]: message.json() for message in got}
