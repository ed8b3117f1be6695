"""What the benchmarks report of an engine's log (ensync.testing.process)."""

from __future__ import annotations

from pathlib import Path

from ensync.testing.process import EngineProcess

__all__: list[str] = []

LOG = """\
2026-11-29 06:40:00,001 INFO ensync.server: serving
2026-11-29 06:41:06,026 ERROR asyncio: Task exception was never retrieved
future: <Task finished name='Task-7' coro=<_Session.write_loop() done> exception=OSError()>
Traceback (most recent call last):
  File "session.py", line 300, in write_loop
    await peer.send(frame)
OSError: [Errno 32] Broken pipe
2026-11-29 06:41:07,000 INFO ensync.server: client gone
2026-11-29 06:41:08,000 WARNING ensync.server.core: refused key (3 times)
"""


def test_problems_name_their_task_and_exception(tmp_path: Path) -> None:
    (tmp_path / "engine.log").write_text(LOG)
    problems = EngineProcess(tmp_path).log_problems()
    assert problems == [
        "2026-11-29 06:41:06,026 ERROR asyncio: Task exception was never retrieved"
        " | future: <Task finished name='Task-7' coro=<_Session.write_loop() done>"
        " exception=OSError()> | OSError: [Errno 32] Broken pipe",
        "2026-11-29 06:41:08,000 WARNING ensync.server.core: refused key (3 times)",
    ]


def test_a_quiet_log_has_no_problems(tmp_path: Path) -> None:
    (tmp_path / "engine.log").write_text(LOG.splitlines()[0] + "\n")
    assert EngineProcess(tmp_path).log_problems() == []
