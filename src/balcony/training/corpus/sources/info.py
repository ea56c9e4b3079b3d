"""`info`: the system's info manuals, node by node, menus and node headers dropped."""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from ..source import Source, pack_paragraphs, search_path


def locate() -> list[Path]:
    """The folders of $INFOPATH, else the system's /usr/share/info."""
    return search_path("INFOPATH", "/usr/share/info")


def info_files(roots: list[Path]) -> list[str]:
    return sorted(str(p) for root in roots for p in Path(root).glob("*.info*") if p.is_file())


def render_info(path: str, max_chars: int = 8000) -> list[str]:
    """An info manual's nodes as text (menus and node headers dropped), joined into documents of
    at most about `max_chars`."""
    try:
        raw = gzip.decompress(Path(path).read_bytes()) if path.endswith(".gz") else Path(path).read_bytes()
    except (OSError, EOFError):
        return []
    nodes = []
    for node in raw.decode("utf-8", errors="replace").split("\x1f")[1:]:
        lines = [line for line in node.splitlines() if not line.startswith(("File: ", "Tag Table:", "* "))]
        nodes.append(re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip().split("* Menu:")[0].strip())
    return pack_paragraphs(nodes, max_chars)


SOURCE = Source("info", False, info_files, lambda batch, ctx: [d for p in batch for d in render_info(p)], batch=1,
                install="install info manuals (apt-get install info)", locate=locate)
