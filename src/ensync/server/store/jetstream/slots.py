"""Slot leases and fence records on JetStream: who owns which slot, and since when.

Each slot ``k`` of the cluster (:mod:`ensync.server.store.ownership`) has two
subjects in the ownership stream (:func:`owned_stream_config`; each write
rolls its subject up to that one message, and a lease has a time to live):

* ``<prefix>.slot.<k>``: the lease: the owner's node id and epoch, with a
  time to live; renewed by its owner (expecting its own last sequence), let
  lapse by the server when it is not, deleted when its owner lets go;
* ``<prefix>.fence.<k>.epoch``: the latest owner's epoch record, kept.

Acquiring a slot writes both in one atomic batch: the lease expecting no
message on its subject (free), the fence record expecting the fence's last
sequence as read. Of two nodes taking one slot, one wins; and every batch
the owner writes to the slot's partitions expects the fence at its own
record, so a former owner's late writes are refused by the server
(tests/conformance/test_fencing.py, test_slot_leases.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

from ensync.server.store.jetstream.api import ROLLUP, ConflictError, JetStreamApi, Out

__all__ = ["SlotLease", "SlotLeases", "fence_subject", "owned_stream_config"]


def fence_subject(prefix: str, slot: int) -> str:
    """What every write to ``slot``'s partitions expects at its owner's record.

    Four tokens, as the slot's partition subjects have at least: a new owner
    reads them all and the fence in one walk, ``<prefix>.*.<slot>.>``
    (:func:`~ensync.server.store.jetstream.partition_logs.recover_slot`).
    """
    return f"{prefix}.fence.{slot}.epoch"


def owned_stream_config(
    stream: str, prefix: str, *, replicas: int = 1, storage: str = "file"
) -> dict[str, Any]:
    """The stream of one-owner-per-partition: live nodes, slot leases and
    fences, and the partition logs (``<prefix>.>``), so that an owner's
    fenced batch and the fence it expects are in one stream.

    No per-subject limit (a partition log keeps many messages): a lease, a
    fence or a node record is kept at one message by rolling its subject up.
    """
    return {
        "name": stream,
        "subjects": [f"{prefix}.>"],
        "storage": storage,
        "num_replicas": replicas,
        "allow_atomic": True,
        "allow_direct": True,
        "allow_msg_ttl": True,
        "allow_rollup_hdrs": True,
    }


@dataclass(frozen=True, slots=True)
class SlotLease:
    """A slot held by this node: its epoch, the lease's and the fence's sequences."""

    slot: int
    epoch: int
    lease_seq: int
    fence_seq: int


class SlotLeases:
    """Acquire, renew and release slot leases for one node.

    Args:
        api: an open JetStream API.
        stream: the stream holding ``<prefix>.slot.*`` and the fences
            (:func:`owned_stream_config`).
        prefix: the subjects' prefix.
        node: this node's id.
        ttl_s: how long the server keeps a lease after its last write.
    """

    def __init__(self, api: JetStreamApi, stream: str, prefix: str, node: str, ttl_s: int) -> None:
        if ttl_s < 1:
            raise ValueError("a lease lives at least a second")
        self._api = api
        self._stream = stream
        self._prefix = prefix
        self.node = node
        self._ttl_s = ttl_s

    @property
    def ttl_s(self) -> int:
        """How long the server keeps a lease after its last write."""
        return self._ttl_s

    def lease_subject(self, slot: int) -> str:
        return f"{self._prefix}.slot.{slot}"

    def fence_subject(self, slot: int) -> str:
        """The slot's fence subject (:func:`fence_subject`)."""
        return fence_subject(self._prefix, slot)

    async def owners(self, slots: int) -> dict[int, tuple[str, int]]:
        """Each leased slot's owner and epoch, as the server has them now."""
        got = await self._api.get_last(self._stream, [f"{self._prefix}.slot.*"])
        found: dict[int, tuple[str, int]] = {}
        for message in got:
            slot = int(message.subject.rsplit(".", 1)[1])
            if slot < slots:
                record = message.json()
                found[slot] = (str(record["node"]), int(record["epoch"]))
        return found

    async def acquire(self, slot: int) -> SlotLease | None:
        """Take ``slot`` if it is free; None if another node holds it (or won the race)."""
        fence = await self._api.get_one(self._stream, {"last_by_subj": self.fence_subject(slot)})
        fence_seq = fence.seq if fence is not None else 0
        epoch = int(fence.json()["epoch"]) + 1 if fence is not None else 1
        record = orjson.dumps({"node": self.node, "epoch": epoch})
        try:
            last = await self._api.atomic(
                [
                    Out(
                        self.lease_subject(slot),
                        record,
                        expect=0,
                        ttl_s=self._ttl_s,
                        headers=ROLLUP,
                    ),
                    Out(self.fence_subject(slot), record, expect=fence_seq, headers=ROLLUP),
                ]
            )
        except ConflictError:
            return None
        return SlotLease(slot=slot, epoch=epoch, lease_seq=last - 1, fence_seq=last)

    async def renew(self, lease: SlotLease) -> SlotLease | None:
        """Keep ``lease`` for another ``ttl_s``; None if it lapsed or was taken."""
        record = orjson.dumps({"node": self.node, "epoch": lease.epoch})
        try:
            seq = await self._api.atomic(
                [
                    Out(
                        self.lease_subject(lease.slot),
                        record,
                        expect=lease.lease_seq,
                        ttl_s=self._ttl_s,
                        headers=ROLLUP,
                    )
                ]
            )
        except ConflictError:
            return None
        return SlotLease(lease.slot, lease.epoch, seq, lease.fence_seq)

    async def release(self, lease: SlotLease) -> None:
        """Let ``slot`` go now rather than when its lease lapses."""
        await self._api.delete(self._stream, lease.lease_seq)
