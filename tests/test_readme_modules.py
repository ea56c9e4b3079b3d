"""The module table of docs/design.md ("Where things are") names every module of the package, and only those."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "balcony"
DOC = ROOT / "docs" / "design.md"


def _listed(headings: bool = False) -> list[str]:
    """The paths in the table's first column; package headings (bold rows) only when asked."""
    text = DOC.read_text()
    # the first table under the heading
    table = next(block for block in text[text.index("## Where things are"):].split("\n\n")
                 if block.startswith("| module |"))
    start = "| **`" if headings else "| `"
    cells = [row.split("|")[1].strip() for row in table.splitlines() if row.startswith(start)]
    return [re.sub(r"^balcony/?", "", cell.strip("*`")) for cell in cells]


def test_the_module_table_lists_every_module_and_nothing_else():
    listed = _listed()
    folders = [entry for entry in listed if entry.endswith("/")]
    modules = {str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
               if p.name != "__main__.py" and not (p.name == "__init__.py" and p.parent != SRC)}
    covered = {m for m in modules if m in listed or any(m.startswith(f) for f in folders)}
    assert covered == modules, f"modules missing from docs/design.md's table: {sorted(modules - covered)}"
    missing = [entry for entry in [*listed, *_listed(headings=True)] if not (SRC / entry).exists()]
    assert not missing, f"docs/design.md's table names what is not in the tree: {missing}"
