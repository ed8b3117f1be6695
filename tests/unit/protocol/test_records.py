from __future__ import annotations

import json

from ensync.protocol.records import Delivery, ReplayInfo, from_replay_json, replay_json

DELIVERY = Delivery(
    idem="01M98S6H1KAKBRHCYV6RP2V68E",
    name="orders/created",
    block=3,
    payload="envelope",
    metadata='{"persist":true,"headers":{"source":"shop"}}',
    sender="sender-id",
    created_at_ms=1_700_000_000_123,
)


def test_a_replay_over_grpc_keeps_when_the_message_was_logged() -> None:
    # The gRPC message has no time field (PROTOCOL.md §2.8); replay's JSON
    # carries it beside the replay information.
    text = replay_json(DELIVERY, ReplayInfo(1_700_000_000_999, True), event_names=False)
    delivery, info = from_replay_json(text, name="orders/created", idem=DELIVERY.idem)
    assert delivery == DELIVERY
    assert info == ReplayInfo(1_700_000_000_999, True)


def test_replay_json_has_exactly_the_stream_message_fields() -> None:
    # The Go client's protojson refuses unknown keys (PROTOCOL.md §2.7).
    text = replay_json(DELIVERY, ReplayInfo(None, False), event_names=True)
    assert set(json.loads(text)) == {
        "event_idem",
        "event_name",
        "payload",
        "partition_block",
        "metadata",
        "sender",
    }


def test_replay_json_of_another_engine_has_no_time() -> None:
    text = json.dumps({"message_idem": "i", "message_name": "n", "payload": "p", "metadata": ""})
    delivery, info = from_replay_json(text, name="n", idem="i")
    assert (delivery.created_at_ms, info) == (0, None)
