"""What a store reads from a message id: when it was made, and for which slot.

Idems (:func:`ensync.server.core.ids.new_idem`) are 26 Crockford base32
digits: 48 bits of epoch milliseconds, then 80 bits that are random, or 70
random bits and the partition's slot in the last :data:`SLOT_BITS`. An
owner node looks a message up from its id alone: the slot says which node
owns it, the time where in that slot's log to start reading.
"""

from __future__ import annotations

__all__ = ["B32", "SLOT_BITS", "idem_time_ms", "slot_bits", "slot_in"]

# Crockford's base32: sortable as text, no ambiguous letters.
B32 = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
#: The low bits of an idem made for a slot: room for 1024 slots.
SLOT_BITS = 10
_DIGITS = {digit: value for value, digit in enumerate(B32)}


def _is_idem(idem: str) -> bool:
    return len(idem) == 26 and all(digit in _DIGITS for digit in idem)


def slot_bits(idem: str) -> int | None:
    """The last :data:`SLOT_BITS` bits of an idem (its slot, if it was made
    for one); ``None`` if ``idem`` is not an idem of this engine."""
    if not _is_idem(idem):
        return None
    return _DIGITS[idem[-2]] * 32 + _DIGITS[idem[-1]]


def idem_time_ms(idem: str) -> int | None:
    """When an idem was made (epoch ms); ``None`` if it is not an idem of this engine."""
    if not _is_idem(idem):
        return None
    value = 0
    for digit in idem[:10]:
        value = value * 32 + _DIGITS[digit]
    return value & ((1 << 48) - 1)


def slot_in(idem: str, slots: int) -> int | None:
    """The slot an idem carries, if it is one of ``slots``; ``None`` otherwise."""
    slot = slot_bits(idem)
    return slot if slot is not None and slot < slots else None
