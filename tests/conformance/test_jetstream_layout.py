"""What a node checks before it uses a namespace: the NATS server's version
and the namespace's layout (store/jetstream/layout.py), on a real nats-server."""

from __future__ import annotations

import pathlib
import re

import orjson
import pytest

from ensync.server.store.jetstream import ClusterStore
from ensync.server.store.jetstream.api import Out
from ensync.server.store.jetstream.layout import (
    LAYOUT,
    LayoutError,
    check_server_version,
    layout_subject,
)
from tests.support.nats import namespace_for, nats_url


def store(namespace: str) -> ClusterStore:
    # A command's store: it joins no node, so a test can open several.
    return ClusterStore([nats_url()], namespace=namespace, serve=False, slots=8)


async def test_a_new_namespace_records_its_layout_and_opens_again(tmp_path: pathlib.Path) -> None:
    namespace = namespace_for(tmp_path)
    first = store(namespace)
    await first.open()
    try:
        api = first.api
        found = await api.get_one(first.names.apps, {"last_by_subj": layout_subject(first.names)})
        assert found is not None
        assert orjson.loads(found.data) == {"layout": LAYOUT, "slots": 8}
        assert first.slot_count == 8
        # Another node, or an `ensync app` command, asking for another slot
        # count: the namespace keeps the one it recorded.
        second = ClusterStore([nats_url()], namespace=namespace, serve=False, slots=64)
        await second.open()
        assert second.slot_count == 8
        await second.close()
    finally:
        await first.close()


@pytest.mark.parametrize(
    ("record", "says"),
    [
        ({"layout": 9}, "has layout 9, written by a newer ensync; this one reads layout 2"),
        (
            {"layout": 1},
            "has layout 1 (every node sharing each message's records), written by an older",
        ),
        ({"layout": 0}, "has layout 0, written by an older ensync"),
        ({"something": "else"}, "unreadable layout record"),
    ],
)
async def test_a_namespace_with_a_layout_this_node_does_not_know_is_refused(
    tmp_path: pathlib.Path, record: dict[str, object], says: str
) -> None:
    namespace = namespace_for(tmp_path)
    first = store(namespace)
    await first.open()
    try:
        api = first.api
        subject = layout_subject(first.names)
        await api.atomic([Out(subject, orjson.dumps(record))])  # one message per subject
        other = store(namespace)
        with pytest.raises(LayoutError, match=re.escape(says)):
            await other.open()
        # Refused before anything was used, and what to do is said.
        with pytest.raises(LayoutError, match="namespace"):
            await store(namespace).open()
    finally:
        await first.close()


@pytest.mark.parametrize("version", ["2.12.0", "2.15.1", "v2.12.3", "3.0.0-beta.1"])
def test_servers_from_2_12_on_are_taken(version: str) -> None:
    check_server_version(version)


@pytest.mark.parametrize(
    ("version", "says"),
    [
        ("2.11.9", "is version 2.11.9: ensync needs NATS Server 2.12 or later"),
        ("2.9.25", "upgrade the NATS servers"),
        ("", "reported version ''"),
    ],
)
def test_older_servers_are_refused_with_what_to_do(version: str, says: str) -> None:
    with pytest.raises(LayoutError, match=re.escape(says)):
        check_server_version(version)
