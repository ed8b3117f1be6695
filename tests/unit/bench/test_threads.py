"""``ensync bench --threads``: runs, prints every figure, and sees who lets go of the GIL.

Tiny runs, no timing asserted (tests/unit/crypto/test_sodium.py times seals).
"""

from __future__ import annotations

import io
import json

import pytest

from ensync.bench import threads
from ensync.bench.display import Progress
from ensync.cli.main import main

__all__: list[str] = []


def test_the_command_prints_every_operation_for_both_bindings_as_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["bench", "--threads", "--messages", "12", "--payload-bytes", "64", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert figures["calls"] == 12
    assert figures["payload_bytes"] == 64
    assert figures["library"]
    rows = {(row["operation"], row["binding"]): row for row in figures["figures"]}
    assert set(rows) == {(op, b) for op in threads.OPERATIONS for b in ("gil-keeping", "pynacl")}
    for row in rows.values():
        for timing in (row["alone"], row["busy_thread"]):
            assert 0 < timing["p50_us"] <= timing["p99_us"] <= timing["max_us"]
        if row["binding"] == "gil-keeping":
            assert row["gil_handoffs"] == 0


def test_the_table_has_a_row_per_operation_and_binding() -> None:
    result = threads.measure(calls=5, payload_bytes=32, progress=Progress(io.StringIO()))
    out = io.StringIO()
    threads.print_table(result, out)
    text = out.getvalue()
    assert "32-byte messages, 5 calls per figure" in text
    for operation in threads.OPERATIONS:
        assert operation in text
    assert text.count("ensync (GIL kept)") == text.count("PyNaCl (GIL released)") == 5
