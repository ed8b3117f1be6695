"""What the owner's table needs of the in-process pieces: a record removed
from the memory table, numbering restarted from another owner's, and a lease
book that forgets partitions."""

from __future__ import annotations

from ensync.server.store import DeliveryPolicy, MessageState, NewMessage
from ensync.server.store.book import LeaseBook
from ensync.server.store.memlog import MemoryMessages
from ensync.server.store.numbering import Sequencer
from ensync.server.store.tables import Tables

KEY = ("app", "orders")
OTHER = ("app", "refunds")


def stored(idem: str, block: int, key: tuple[str, str] = KEY) -> NewMessage:
    return NewMessage(idem, key[0], key[1], "p", "{}", "sender", 0)


def test_a_removed_record_leaves_every_index() -> None:
    table = MemoryMessages()
    table.add(stored("a", 1).numbered(1))
    table.add(stored("b", 2).numbered(2))
    assert table.settle("b", MessageState.DEAD, 5, "bad")
    assert table.remove("a") is not None
    assert table.remove("b") is not None
    assert table.remove("a") is None
    assert "a" not in table
    assert table.page(KEY, 0, 10, 100, 10) == []
    assert table.list_dead("app", 10) == []
    assert table.backlog() == {}
    assert table.prune(10**12) == 0


def test_numbering_restarts_from_another_owners_last_block() -> None:
    numbers: Sequencer[str] = Sequencer()
    for _ in range(5):
        numbers.number(KEY)
    for block in range(1, 6):
        numbers.resolve(KEY, block, "x")
    numbers.restart(KEY, 3)  # the log says 3: blocks 4 and 5 were never stored
    assert numbers.number(KEY) == 4
    numbers.restart(OTHER, 9)
    assert (numbers.number(OTHER), numbers.released_upto(OTHER)) == (10, 9)
    # A block still being stored keeps its place.
    numbers.restart(KEY, 2)
    assert numbers.number(KEY) == 5


async def test_a_book_forgets_the_partitions_it_is_told_to() -> None:
    memory = MemoryMessages()
    for index, key in enumerate((KEY, OTHER), start=1):
        memory.add(stored(f"m{index}", 1, key).numbered(1))
    numbers: Sequencer[object] = Sequencer()
    for key in (KEY, OTHER):
        numbers.seed(key, 1)
    book = LeaseBook(Tables(memory, None, numbers))  # type: ignore[arg-type]
    policy = DeliveryPolicy()
    (claim_a, _), (claim_b, _) = [
        await book.claim(key, limit=5, now_ms=0, policy=policy) for key in (KEY, OTHER)
    ]
    assert book.holds("m1")
    assert book.holds("m2")
    book.drop([KEY])
    assert not book.holds("m1")
    assert book.holds("m2")
    # A lease of a forgotten partition is stale: it cannot be extended.
    assert not book.extend("m1", claim_a.leases[0].token, 10_000)
    assert book.extend("m2", claim_b.leases[0].token, 10_000)
