"""Every code block of the README and of docs/ runs, or says why it does not.

The convention, for whoever writes a page:

* A ```` ```python ```` block is a **whole program**. It runs in a process of
  its own against a real engine and must exit 0 within a minute. It reads
  where the engine is and which app it is from the environment, with
  defaults that work beside ``make run``: ``ENSYNC_URL`` (gRPC),
  ``ENSYNC_WS_URL`` (WebSocket), ``ENSYNC_APP_KEY``, ``ENSYNC_SECRET_KEY``
  and ``ENSYNC_APP_ID`` (one app, registered for this block alone, so a
  program can send to itself), ``ENSYNC_TO`` (a second app's id) and
  ``ENSYNC_DATA`` (the engine's data directory, sqlite store). A
  program that would wait forever (a subscriber loop) ends after a message.
* ``<!-- run: pytest -->`` on the line before a Python block: the block is a
  test module of an application. It runs with pytest in a project of its
  own, with ensync's plugin (the ``ensync_engine`` and ``ensync_app``
  fixtures) and pytest-asyncio in auto mode; ``<!-- run: pytest strict -->``
  in strict mode. Every test in it must pass.
* ``<!-- not run: REASON -->`` on the line before a block exempts it: shell,
  Node and Go code, output, layouts, fragments, long-running commands. The
  reason is said in a few words (``shell``, ``output``, ``a fragment``).
  HTML comments do not show on the rendered page.
* A block made only of snippet lines (``--8<-- "examples/tour.py"``) shows
  those files; an example file counts as run, because
  tests/integration/test_examples.py runs every file of examples/. So does
  a README block that is, verbatim, one of those files.

Anything else fails :func:`test_every_block_is_run_or_marked`, naming the
file and the line of the fence.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ensync.testing import TestServer, run_engine
from ensync.testing.process import dies_with_parent
from tests.support.leaks import record_text
from tests.support.timing import seconds

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_MARKER = re.compile(r"^ *<!--\s*(?P<kind>not run|run):\s*(?P<value>.*?)\s*-->\s*$")
_SNIPPET = re.compile(r'^--8<-- "(?P<path>[^"]+)"$')
_RUN_MODES = {"pytest": "auto", "pytest strict": "strict"}


@dataclass(frozen=True, slots=True)
class Block:
    """One fenced code block of a Markdown file."""

    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    marker: tuple[str, str] | None  # ("not run" | "run", value), from the line before

    @property
    def where(self) -> str:
        try:
            name = self.path.relative_to(ROOT)
        except ValueError:
            name = self.path
        return f"{name}:{self.line}"

    @property
    def included(self) -> list[str]:
        """The files a snippet-only block shows (empty for any other block)."""
        lines = [line for line in self.code.splitlines() if line.strip()]
        matches = [_SNIPPET.match(line.strip()) for line in lines]
        if not lines or not all(matches):
            return []
        return [match["path"] for match in matches if match]


def blocks_of(path: Path, text: str | None = None) -> Iterator[Block]:
    """The fenced blocks of a Markdown file, with the marker before each.

    Raises:
        ValueError: a marker that is not followed by a fence, or a fence
            that is never closed.
    """
    lines = (path.read_text() if text is None else text).splitlines()
    index = 0
    while index < len(lines):
        marker = _MARKER.match(lines[index])
        if marker and not (index + 1 < len(lines) and _FENCE.match(lines[index + 1])):
            raise ValueError(f"{path}:{index + 1}: a code-block marker must be followed by a fence")
        opening = _FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        indent, fence = len(opening["indent"]), opening["fence"]
        info = opening["info"].strip()
        language = info.split()[0].lstrip(".").lower() if info else ""
        before = _MARKER.match(lines[index - 1]) if index else None
        body: list[str] = []
        end = index + 1
        while end < len(lines):
            closing = lines[end].strip()
            if closing.startswith(fence[0] * len(fence)) and not closing.strip(fence[0]):
                break
            body.append(lines[end][indent:] if lines[end][:indent].isspace() else lines[end])
            end += 1
        else:
            raise ValueError(f"{path}:{index + 1}: the code block is never closed")
        yield Block(
            path=path,
            line=index + 1,
            language=language,
            code="\n".join(body) + "\n",
            marker=(before["kind"], before["value"]) if before else None,
        )
        index = end + 1


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def example_files() -> dict[str, str]:
    """examples/*.py by text, as tests/integration/test_examples.py runs them."""
    return {path.read_text(): path.name for path in sorted(EXAMPLES.glob("*.py"))}


def problem(block: Block) -> str | None:
    """Why ``block`` is neither run nor exempt, or None if it is fine."""
    if block.marker is not None:
        kind, value = block.marker
        if kind == "not run":
            return None if value else "`not run` needs a reason"
        if value not in _RUN_MODES:
            return f"unknown marker `run: {value}` (known: {', '.join(_RUN_MODES)})"
        return None if block.language == "python" else "`run: pytest` on a block that is not python"
    if block.included:
        missing = [name for name in block.included if not (ROOT / name).is_file()]
        if missing:
            return f"includes missing files: {', '.join(missing)}"
        not_run = [name for name in block.included if Path(name).parent != Path("examples")]
        if not_run or block.language != "python":
            return "includes files that no test runs: mark it, or include examples/*.py"
        return None
    if block.language == "python":
        return None  # a program: test_program_block runs it
    return (
        f"a {block.language or 'plain'} block that is not run:"
        " mark it with <!-- not run: REASON --> on the line before"
    )


def all_blocks() -> list[Block]:
    return [block for path in markdown_files() for block in blocks_of(path)]


def _kind(block: Block, examples: dict[str, str]) -> str:
    if block.language != "python" or block.included or block.code in examples:
        return "other"
    if block.marker is None:
        return "program"
    kind, value = block.marker
    return "pytest" if kind == "run" and value in _RUN_MODES else "other"


_EXAMPLES = example_files()
_BLOCKS = all_blocks()
PROGRAMS = [block for block in _BLOCKS if _kind(block, _EXAMPLES) == "program"]
PYTEST_BLOCKS = [block for block in _BLOCKS if _kind(block, _EXAMPLES) == "pytest"]


# --------------------------------------------------------------------------- the rules


def test_every_block_is_run_or_marked() -> None:
    problems = [
        f"{block.where}: {reason}" for block in _BLOCKS if (reason := problem(block)) is not None
    ]
    assert not problems, "code blocks neither run nor marked:\n" + "\n".join(problems)


def test_the_readme_shows_the_examples_verbatim() -> None:
    readme = [block for block in _BLOCKS if block.path.name == "README.md"]
    shown = {_EXAMPLES[block.code] for block in readme if block.code in _EXAMPLES}
    assert shown == {"publisher.py", "subscriber.py"}, shown


def test_the_site_includes_every_example() -> None:
    included = {name for block in _BLOCKS for name in block.included}
    assert included == {f"examples/{name}" for name in _EXAMPLES.values()}, included


@pytest.mark.parametrize(
    ("markdown", "reason"),
    [
        ("```sh\nls\n```\n", "a sh block that is not run"),
        ("```\nplain\n```\n", "a plain block that is not run"),
        ("<!-- not run: -->\n```sh\nls\n```\n", "needs a reason"),
        ("<!-- run: node -->\n```python\npass\n```\n", "unknown marker"),
        ('```python\n--8<-- "examples/none.py"\n```\n', "missing files"),
        ('```python\n--8<-- "README.md"\n```\n', "no test runs"),
    ],
    ids=["shell", "plain", "no-reason", "unknown-run", "missing-file", "not-an-example"],
)
def test_a_block_neither_run_nor_marked_is_named(markdown: str, reason: str) -> None:
    (block,) = blocks_of(ROOT / "page.md", "text\n\n" + markdown)
    found = problem(block)
    assert found is not None
    assert reason in found, found
    fence_line = 4 if markdown.startswith("<!--") else 3
    assert block.where == f"page.md:{fence_line}"


def test_blocks_are_found_in_lists_with_their_markers() -> None:
    markdown = textwrap.dedent(
        """\
        - an item:

          <!-- not run: output -->
          ```text
          indented
          ```
        - another:

          ````python
          print("```")
          ````
        """
    )
    output, program = blocks_of(ROOT / "page.md", markdown)
    assert (output.line, output.marker, output.code) == (4, ("not run", "output"), "indented\n")
    assert (program.line, program.marker, program.code) == (9, None, 'print("```")\n')
    assert problem(output) is None
    assert problem(program) is None


def test_a_marker_must_stand_before_a_fence() -> None:
    with pytest.raises(ValueError, match=r"page\.md:1: a code-block marker"):
        list(blocks_of(ROOT / "page.md", "<!-- not run: shell -->\n\n```sh\nls\n```\n"))


# --------------------------------------------------------------------------- running them


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[TestServer]:
    """An engine as ``make run`` serves one: the sqlite store in a data directory."""
    async with run_engine(store="sqlite:", data_dir=tmp_path / "data") as server:
        yield server


async def _run(
    argv: list[str], cwd: Path, env: dict[str, str], timeout_s: float
) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        *dies_with_parent(argv),
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout_s)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
        return -1, output.decode(errors="replace") + f"\n(killed after {timeout_s:g} s)"
    assert process.returncode is not None
    return process.returncode, output.decode(errors="replace")


@pytest.mark.parametrize("block", PROGRAMS, ids=[block.where for block in PROGRAMS])
async def test_program_block(block: Block, engine: TestServer, tmp_path: Path) -> None:
    app = await engine.create_app("shop")
    other = await engine.create_app("warehouse")
    program = tmp_path / "program.py"
    program.write_text(block.code)
    env = {
        **os.environ,
        "ENSYNC_URL": engine.grpc_url,
        "ENSYNC_WS_URL": engine.ws_url,
        "ENSYNC_APP_KEY": app.app_key,
        "ENSYNC_SECRET_KEY": app.secret_key,
        "ENSYNC_APP_ID": app.app_id,
        "ENSYNC_TO": other.app_id,
        "ENSYNC_DATA": str(engine.data_dir),
    }
    code, output = await _run([sys.executable, str(program)], tmp_path, env, seconds(50))
    record_text(f"the program at {block.where}", output)
    assert code == 0, f"the program at {block.where} failed ({code}):\n{output}"
    # A reader runs a page's blocks one after another with one app: a message
    # that a block left unsettled would reach the next block before its own.
    deadline = time.monotonic() + seconds(2)
    while left := (await engine.engine.store.backlog()).get(app.app_id, 0):
        assert time.monotonic() < deadline, f"the program at {block.where} left {left} unsettled"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("block", PYTEST_BLOCKS, ids=[block.where for block in PYTEST_BLOCKS])
def test_pytest_block(block: Block, tmp_path: Path) -> None:
    assert block.marker is not None
    mode = _RUN_MODES[block.marker[1]]
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_block.py").write_text(block.code)
    (tmp_path / "pytest.ini").write_text(
        f"[pytest]\nasyncio_mode = {mode}\nasyncio_default_fixture_loop_scope = function\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=seconds(50),
        check=False,
    )
    output = done.stdout + done.stderr
    record_text(f"the test module at {block.where}", output)
    assert done.returncode == 0, f"the tests at {block.where} failed:\n{output}"
    assert re.search(r"^\d+ passed in ", done.stdout, re.MULTILINE), output
