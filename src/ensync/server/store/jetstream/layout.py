"""What a node checks before it uses a namespace: the NATS server's version
and the namespace's layout version.

* The backend needs NATS Server 2.12 or later (atomic batches; per-message
  TTLs came in 2.11). An older server would refuse
  its writes one by one with errors that do not say why; a node refuses to
  start instead, saying which version it found.
* Each namespace records the layout of its streams and records under
  ``<ns>.app.layout`` when it is first used. A node that finds a layout it
  does not know (a newer ensync wrote it, or an older one) refuses to start
  rather than misread or damage it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from typing import Any

import orjson

from ensync.server.store.base import StoreError
from ensync.server.store.jetstream.api import ConflictError, JetStreamApi, Out
from ensync.server.store.jetstream.records import Names

__all__ = [
    "LAYOUT",
    "MIN_SERVER",
    "LayoutError",
    "check_server_version",
    "ensure_layout",
    "layout_subject",
]

#: The layout this version reads and writes: one owner per partition, the
#: slot count recorded with it.
LAYOUT = 2
# Layouts of earlier versions, and what they were.
_EARLIER = {1: "every node sharing each message's records"}
#: The oldest NATS Server the backend works with.
MIN_SERVER = (2, 12)

_VERSION = re.compile(r"v?(\d+)\.(\d+)")


class LayoutError(StoreError):
    """The NATS server or the namespace is not one this node can use; the
    message says what it found and what to do."""


def check_server_version(version: str) -> None:
    """Refuse a NATS server older than :data:`MIN_SERVER` (or whose version
    says nothing), with what to do.

    Raises:
        LayoutError: too old, or not a version.
    """
    found = _VERSION.match(version.strip())
    needed = ".".join(map(str, MIN_SERVER))
    if found is None:
        raise LayoutError(
            f"the NATS server reported version {version!r}: ensync needs"
            f" NATS Server {needed} or later with JetStream"
        )
    if (int(found[1]), int(found[2])) < MIN_SERVER:
        raise LayoutError(
            f"the NATS server is version {version}: ensync needs NATS Server {needed} or"
            " later (atomic batches); upgrade the NATS servers"
        )


def layout_subject(names: Names) -> str:
    """Where a namespace records its layout (in the apps stream)."""
    return f"{names.ns}.app.layout"


async def ensure_layout(
    api: JetStreamApi,
    names: Names,
    layout: int = LAYOUT,
    details: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Record ``layout`` (with ``details``) in a namespace that has none;
    refuse another. The record found, or the one written.

    Raises:
        LayoutError: the namespace has a layout this store does not read.
        StoreError: JetStream did not answer.
    """
    subject = layout_subject(names)
    record = {"layout": layout, **(details or {})}
    for _ in range(10):
        found = await api.get_one(names.apps, {"last_by_subj": subject})
        if found is not None:
            return _check_layout(names, found.data, layout)
        try:
            await api.atomic([Out(subject, orjson.dumps(record), expect=0)])
            return record
        except ConflictError:
            # Another node recorded it first (or a replica that answered the
            # read had not caught up): read again.
            await asyncio.sleep(0.1)
    raise StoreError(f"could not read or record the layout of namespace {names.ns!r}")


def _check_layout(names: Names, data: bytes, wanted: int) -> dict[str, Any]:
    try:
        record = orjson.loads(data)
        layout = record["layout"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        layout = None
    if layout == wanted:
        return dict(record)
    if isinstance(layout, int) and not isinstance(layout, bool):
        newer = "a newer" if layout > wanted else "an older"
        what = f" ({_EARLIER[layout]})" if layout in _EARLIER else ""
        raise LayoutError(
            f"namespace {names.ns!r} has layout {layout}{what}, written by {newer} ensync;"
            f" this one reads layout {wanted}: run the ensync version that wrote it, or use"
            " another namespace (?namespace=...)"
        )
    raise LayoutError(
        f"namespace {names.ns!r} has an unreadable layout record ({data[:80]!r}) under"
        f" {layout_subject(names)}: it was not written by ensync; use another namespace"
    )
