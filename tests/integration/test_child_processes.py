"""``dies_with_parent``: a child started through it dies with its parent,
however the parent dies."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from ensync.testing.process import dies_with_parent
from tests.support.processes import alive
from tests.support.timing import seconds

# A parent that starts a long sleep through dies_with_parent, says its pid,
# and waits to be killed.
_PARENT = """
import subprocess, sys, time
from ensync.testing.process import dies_with_parent
child = subprocess.Popen(dies_with_parent(["sleep", "120"]))
print(child.pid, flush=True)
time.sleep(120)
"""


def test_a_child_dies_with_a_parent_killed_hard() -> None:
    child = 0
    with subprocess.Popen(
        [sys.executable, "-c", _PARENT], stdout=subprocess.PIPE, text=True
    ) as parent:
        try:
            assert parent.stdout is not None
            child = int(parent.stdout.readline())
            time.sleep(0.2)  # until the launcher became the program
            assert Path(f"/proc/{child}/cmdline").read_text().split("\0")[:2] == ["sleep", "120"]
            parent.kill()  # no chance to stop its child
            parent.wait(seconds(10))
            deadline = time.monotonic() + seconds(5)
            while alive(child):
                assert time.monotonic() < deadline, "the child outlived its parent"
                time.sleep(0.02)
        finally:
            parent.kill()
            if child and alive(child):  # a failed test leaves nothing behind
                os.kill(child, signal.SIGKILL)


def test_the_program_runs_as_given() -> None:
    done = subprocess.run(
        dies_with_parent(
            [sys.executable, "-c", "import sys; sys.exit(sys.argv[1:] == ['a b'])", "a b"]
        ),
        timeout=seconds(30),
        check=False,
    )
    assert done.returncode == 1  # argv passed through as it was, exit status too
    missing = subprocess.run(
        dies_with_parent(["no-such-program-here"]),
        capture_output=True,
        text=True,
        timeout=seconds(30),
        check=False,
    )
    assert missing.returncode == 127
    assert "cannot run no-such-program-here" in missing.stderr
