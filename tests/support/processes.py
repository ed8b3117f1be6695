"""Which processes run, read from /proc (Linux): for tests that check that
children die with their parent."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

__all__ = ["alive", "descendants"]


def _stat_fields(pid: int) -> list[str]:
    # After the command name, which may hold spaces and parentheses.
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie is dead (whoever adopted it may never reap it)."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def descendants(pid: int) -> set[int]:
    """The living processes below ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = _stat_fields(int(entry))
                if fields[0] != "Z":
                    children.setdefault(int(fields[1]), []).append(int(entry))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found
