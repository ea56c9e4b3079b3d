"""`man`: the system's manual pages of sections 1, 5, 7 and 8 (commands, formats, overviews,
administration), rendered to plain text by `man` itself."""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from pathlib import Path

from ..source import Source, search_path

SECTIONS = ("man1", "man5", "man7", "man8")
# a family of pages (names sharing their first word, e.g. one tool's subcommands) larger than
# this is generated reference (an SDK's thousands of near-identical pages): too little variety
MAX_FAMILY = 1000
INSTALL = "install manual pages (apt-get install man-db manpages)"


def locate() -> list[Path]:
    """The folders of $MANPATH, else the system's /usr/share/man."""
    return search_path("MANPATH", "/usr/share/man")


def family(name: str) -> str:
    return re.split(r"[-_.]", name, maxsplit=1)[0]


def man_pages(roots: list[Path]) -> list[str]:
    """The pages under `roots` (man folders, each holding man1, man5, ...), sorted, generated families left out."""
    pages = sorted(str(p) for root in roots for section in SECTIONS for p in (Path(root) / section).glob("*")
                   if p.is_file())
    sizes = Counter(family(Path(p).name) for p in pages)
    return [p for p in pages if sizes[family(Path(p).name)] <= MAX_FAMILY]


def render_man(path: str) -> str:
    """A man page as plain text: no hyphenation or justification, indentation removed."""
    try:
        out = subprocess.run(["man", "--nh", "--nj", "-l", path], capture_output=True, timeout=30,
                             env={**os.environ, "MANWIDTH": "100", "MAN_KEEP_FORMATTING": "", "LC_ALL": "C.UTF-8"})
    except (OSError, subprocess.TimeoutExpired):
        return ""
    text = out.stdout.decode("utf-8", errors="replace")
    lines = [line.strip() for line in text.strip().splitlines()[1:-1]]  # header and footer name the page only
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


SOURCE = Source("man", False, man_pages, lambda batch, ctx: [render_man(p) for p in batch], batch=32,
                install=INSTALL, locate=locate)
