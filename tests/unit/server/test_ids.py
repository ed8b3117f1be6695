"""Message ids: the ULID layout, in Crockford base32, never repeated."""

from __future__ import annotations

import os
import re
import warnings
from unittest import mock

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ensync.server.core import ids
from ensync.server.store import idems

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def reference_encoding(value: int) -> str:
    """The ULID text of a 128-bit value, digit by digit."""
    return "".join(CROCKFORD[(value >> (5 * (25 - i))) & 31] for i in range(26))


@given(
    now_ms=st.integers(min_value=0, max_value=(1 << 48) - 1),
    random=st.binary(min_size=10, max_size=10),
)
def test_an_idem_is_the_ulid_of_its_time_and_random_bits(now_ms: int, random: bytes) -> None:
    taken: list[int] = []

    def fixed(count: int) -> bytes:
        taken.append(count)
        return random

    with mock.patch.object(ids, "random_bytes", fixed):
        idem = ids.new_idem(now_ms)
    assert taken == [10]
    assert idem == reference_encoding((now_ms << 80) | int.from_bytes(random))


def test_idems_sort_by_time_and_do_not_repeat() -> None:
    made = [ids.new_idem(1_700_000_000_000 + i // 100) for i in range(20_000)]
    assert len(set(made)) == len(made)
    assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", idem) for idem in made)
    assert [idem[:10] for idem in made] == sorted(idem[:10] for idem in made)


def test_a_forked_child_does_not_reuse_the_parents_random_bytes() -> None:
    ids.new_idem(0)  # the parent now holds a buffer of random bytes
    read, write = os.pipe()
    with warnings.catch_warnings():
        # Python 3.12 frowns on fork() in a process with threads; this child
        # only writes to a pipe and exits.
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:  # the child: one idem, back to the parent, and out
        os.close(read)
        os.write(write, ids.new_idem(0).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child != ids.new_idem(0)


def test_an_idem_made_for_a_slot_carries_it_and_stays_sortable_and_unguessable() -> None:
    for slot in (0, 1, 63, 64, 511, 1023):
        made = [ids.new_idem(1_700_000_000_000 + i, slot=slot) for i in range(200)]
        assert {ids.idem_slot(idem) for idem in made} == {slot}
        assert made == sorted(made)  # one per millisecond: time order is text order
        assert len({idem[10:-2] for idem in made}) == len(made)  # the random part varies
        assert all(re.fullmatch(r"[0-9A-HJKMNP-TV-Z]{26}", idem) for idem in made)
    for slot in (-1, 1024):
        with pytest.raises(ValueError, match="0 to 1023"):
            ids.new_idem(0, slot=slot)
    for bad in ("", "0" * 25, "0" * 27, "I" * 26, "0" * 25 + "u"):
        with pytest.raises(ValueError, match="not an idem"):
            ids.idem_slot(bad)


def test_a_store_reads_an_idems_time_and_slot_and_nothing_from_other_ids() -> None:
    for now in (0, 1, 1_700_000_000_123, (1 << 48) - 1):
        made = ids.new_idem(now, slot=77)
        assert idems.idem_time_ms(made) == now
        assert idems.slot_bits(made) == 77
    for other in ("m-1", "", "0" * 25, "I" * 26):
        assert idems.idem_time_ms(other) is None
        assert idems.slot_bits(other) is None
