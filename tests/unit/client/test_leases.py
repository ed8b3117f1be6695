"""The lease keeper: extends what it holds a third of the deadline after the
last lease, lets go of what the engine refuses, retries when the link is down."""

from __future__ import annotations

from ensync import errors
from ensync.client.leases import LeaseKeeper


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Engine:
    def __init__(self) -> None:
        self.extended: list[str] = []
        self.refuse: set[str] = set()
        self.down = False

    async def extend(self, idem: str) -> int:
        if self.down:
            raise errors.EnSyncConnectionError("link down")
        if idem in self.refuse:
            raise errors.EnSyncAckError(f"message {idem} is not in flight")
        self.extended.append(idem)
        return 0


async def test_held_messages_are_extended_once_an_interval_passed() -> None:
    clock, engine = Clock(), Engine()
    keeper = LeaseKeeper(3_000, engine.extend, now=clock)
    assert keeper.interval_s == 1.0
    keeper.hold("a")
    clock.now += 0.5
    keeper.hold("b")
    clock.now += 0.5
    await keeper.extend_due()
    assert engine.extended == ["a"]  # b was leased half an interval ago
    clock.now += 0.5
    await keeper.extend_due()
    assert engine.extended == ["a", "b"]
    keeper.drop("a")
    clock.now += 1.0
    await keeper.extend_due()
    assert engine.extended == ["a", "b", "b"]
    assert len(keeper) == 1
    await keeper.close()


async def test_a_refused_extension_lets_go_and_a_lost_link_retries() -> None:
    clock, engine = Clock(), Engine()
    keeper = LeaseKeeper(3_000, engine.extend, now=clock)
    keeper.hold("settled-elsewhere")
    keeper.hold("kept")
    engine.refuse.add("settled-elsewhere")
    engine.down = True
    clock.now += 1.0
    await keeper.extend_due()
    assert len(keeper) == 2  # nothing known yet: the link is down
    engine.down = False
    await keeper.extend_due()
    assert "settled-elsewhere" not in keeper
    assert "kept" in keeper
    assert engine.extended == ["kept"]
    assert keeper.extended == 1
    await keeper.close()
    assert len(keeper) == 0
