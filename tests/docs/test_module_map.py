"""The module map of docs/architecture.md, which ``make docs`` generates."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.module_map import MARKER, SRC, module_table, modules, role

__all__: list[str] = []

ARCHITECTURE = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"


def test_the_page_holds_the_marker_the_build_replaces() -> None:
    assert MARKER in ARCHITECTURE.read_text(encoding="utf-8").splitlines()


def test_every_module_has_a_row_with_its_length_and_a_role() -> None:
    rows = {module.path: module for module in modules()}
    expected = {
        path.relative_to(SRC).as_posix()
        for path in SRC.rglob("*.py")
        if path.relative_to(SRC).parts[0] != "_proto"
    }
    assert set(rows) == expected
    for path, module in rows.items():
        assert module.lines == len((SRC / path).read_text(encoding="utf-8").splitlines())
        assert module.role, f"{path} has no docstring to take its role from"
    table = module_table()
    assert "| `bench/throughput.py` |" in table
    assert table.count("\n") == len(rows) + 2


@pytest.mark.parametrize(
    ("docstring", "expected"),
    [
        (None, ""),
        ("One line.", "One line."),
        ("Wrapped onto\ntwo lines.\n\nMore.", "Wrapped onto two lines."),
        ("Checks on input. Pure functions.", "Checks on input."),
        (
            "``ensync bench --soak``: a load, e.g. a soak.",
            "`ensync bench --soak`: a load, e.g. a soak.",
        ),
        ("A :class:`~ensync.server.store.base.Store` in memory.", "A `Store` in memory."),
        ("See :mod:`.store`, :func:`open_store`.", "See `store`, `open_store`."),
    ],
)
def test_a_role_is_the_first_sentence_in_markdown(docstring: str | None, expected: str) -> None:
    assert role(docstring) == expected


def test_pipes_end_no_cell_outside_code_spans(tmp_path: Path) -> None:
    (tmp_path / "verbs.py").write_text('"""``app create | list``: apps | keys."""\n')
    table = module_table(tmp_path)
    assert table.splitlines()[-1] == r"| `verbs.py` | 1 | `app create | list`: apps \| keys. |"
