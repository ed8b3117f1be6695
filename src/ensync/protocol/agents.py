"""What the engine reads from a gRPC client's user agent (PROTOCOL.md §2.5, §2.7).

Official clients cannot be told apart any other way, and two of their
quirks need a different answer: grpc-js reads only the first stream it
opens, and the official Python client decrypts Replay's ``message_data``
directly instead of parsing it.
"""

from __future__ import annotations

__all__ = ["is_go_client", "reads_oldest_stream_only", "wants_bare_replay"]


def reads_oldest_stream_only(user_agent: str) -> bool:
    """A grpc-js client (the Node SDK): deliver everything on its oldest stream,
    and never end its streams with an error status.

    >>> reads_oldest_stream_only("grpc-node-js/1.14.7")
    True
    """
    return user_agent.startswith("grpc-node-js/")


def wants_bare_replay(user_agent: str) -> bool:
    """The official Python client: Replay's ``message_data`` is the bare payload.
    Our SDK announces ``ensync-python/…`` first and gets the JSON form.

    >>> wants_bare_replay("grpc-python-asyncio/1.85.3"), wants_bare_replay("ensync-python/0.1.0")
    (True, False)
    """
    return user_agent.startswith("grpc-python")


def is_go_client(user_agent: str) -> bool:
    """The official Go SDK's gRPC engine: it subscribes again at once after a
    refused Subscribe, and closes by dropping its streams without a word.

    >>> is_go_client("grpc-go/1.64.0"), is_go_client("grpc-python/1.66.0")
    (True, False)
    """
    return user_agent.startswith("grpc-go/")
