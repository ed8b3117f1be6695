"""Typed values of the SDK's public API."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from ensync import errors

__all__ = ["Message", "PublishResult", "ReplayInfo"]


class Settler(Protocol):
    """Whoever can settle a received message: the subscription it came from."""

    async def ack(self, idem: str, block: int) -> None: ...

    async def defer(self, idem: str, delay_ms: int = 1000, reason: str = "") -> int: ...

    async def discard(self, idem: str, reason: str = "") -> None: ...


@dataclass(frozen=True, slots=True)
class ReplayInfo:
    """What a replay says about the message it returned."""

    is_replayed: bool
    replay_timestamp: int | None
    was_acknowledged: bool


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What became of one payload of ``EnSyncClient.publish_many``.

    Attributes:
        idem: the message's idem (several recipients' idems joined by
            ``,``), or None if it failed.
        error: why it failed, or None.
    """

    idem: str | None
    error: errors.EnSyncError | None

    @property
    def ok(self) -> bool:
        """True when the engine stored the message."""
        return self.error is None


# Not slotted: a received message carries its settler as an attribute that
# is no field (not compared, not in ``asdict``, not pickled or copied).
@dataclass(frozen=True)
class Message:
    """A received (decrypted) message.

    A message delivered to a subscription settles itself: ``await
    message.ack()``, ``message.defer(...)``, ``message.discard(...)``, the
    same as the subscription's verbs with its idem. Copies cannot: an
    observed or replayed message, or one made by ``dataclasses.replace``,
    ``copy`` or ``pickle``, raises and says so.

    Attributes:
        message_name: e.g. ``"orders/status/updated"``.
        idem: the message's unique id; pass it to ack, defer, discard, replay.
        block: its sequence number in the (recipient, name) partition.
        payload: the decrypted JSON payload.
        timestamp: epoch milliseconds: when the engine logged it if the
            transport says, else when it was received.
        metadata: the publisher's metadata (``persist``, ``headers``, ...).
        sender: the publishing app's id; publish to it to reply.
        replay_info: set on messages returned by ``replay``.
        attempt: which delivery of this message this is (1 = the first; 0
            for a copy from `EnSyncClient.observe`, which is no delivery).
    """

    message_name: str
    idem: str
    block: int
    payload: Any
    timestamp: int | None
    metadata: dict[str, Any] = field(default_factory=dict)
    sender: str = ""
    replay_info: ReplayInfo | None = None
    attempt: int = 1

    @property
    def headers(self) -> dict[str, Any]:
        """The publisher's headers (``metadata["headers"]``), ``{}`` if none."""
        headers = self.metadata.get("headers")
        return headers if isinstance(headers, dict) else {}

    async def ack(self) -> None:
        """Acknowledge this message: it is done and will not be delivered again.

        For example (in a handler of a subscription with ``auto_ack=False``):

            await message.ack()

        Raises:
            EnSyncAckError: the engine refused, or this is a copy that
                cannot be settled.
        """
        await self._settler("ack", errors.EnSyncAckError).ack(self.idem, self.block)

    async def defer(self, delay_ms: int = 1000, reason: str = "") -> int:
        """Deliver this message again after ``delay_ms`` (0 … 86 400 000).

        Returns the scheduled delivery time in epoch milliseconds.

        Raises:
            EnSyncDeferError: the engine refused, or this is a copy.
            EnSyncValidationError: ``delay_ms`` is out of range.
        """
        return await self._settler("defer", errors.EnSyncDeferError).defer(
            self.idem, delay_ms, reason
        )

    async def discard(self, reason: str = "") -> None:
        """Drop this message for good; it goes to the app's dead letters.

        Raises:
            EnSyncDiscardError: the engine refused, or this is a copy.
        """
        await self._settler("discard", errors.EnSyncDiscardError).discard(self.idem, reason)

    def _settler(self, verb: str, error: type[errors.EnSyncError]) -> Settler:
        settler: Settler | None = self.__dict__.get("_settled_by")
        if settler is None:
            if self.attempt == 0:
                what = "an observed copy"
            elif self.replay_info is not None:
                what = "a replayed copy"
            else:
                what = "a copy"
            raise error(
                f"cannot {verb} message {self.idem}: it is {what}, not a delivery"
                " (settle deliveries from a subscription: the message a handler,"
                " async for, get or fetch gave you)"
            )
        return settler

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_settled_by", None)
        return state


def settled_by(message: Message, settler: Settler) -> Message:
    """Let ``message`` settle itself through ``settler`` (its subscription)."""
    # Frozen: the attribute goes in past __setattr__, as the dataclass's
    # own __init__ does.
    message.__dict__["_settled_by"] = settler
    return message
