"""What a corpus source is: where a machine keeps its text, and how its items become documents.

A source lists its items (man pages, HTML pages, prompts, ...) in a fixed order; `grow` adds
them in that order, shuffled by a seed, and a manifest's cursor counts how many were done. So
the list must not change between runs on one machine: paths are sorted, prompt lists are
package data that is only ever appended to.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ...default import RESOURCES
from .clean import Decontaminator
from .store import CorpusError

MIN_WORDS = 40


@dataclass(frozen=True)
class Source:
    """One kind of training text.

    `locate()` finds where this machine keeps it (an empty list: nowhere, and `install` says
    what gives it); `--source-path` replaces what it finds. `items(paths)` is the whole order
    (before the seeded shuffle); `make(batch, ctx)` turns a batch of items into documents: text,
    or (head, body), where the head (a chat template and prompt) is kept as it is and only the
    body (what was read, an answer) is checked against evaluation text."""

    name: str
    needs_model: bool
    items: Callable[[list[Path]], list]
    make: Callable
    batch: int = 16
    install: str = ""
    # times the item list is gone through, each round in its own seeded order: a sampled source
    # answers the same prompt afresh in each round, so it grows past its prompt list
    rounds: int = 1
    locate: Callable[[], list[Path]] | None = None  # None: the source reads nothing of the machine's


@dataclass
class Context:
    model: object | None
    tokenizer: object
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 0.95
    min_words: int = MIN_WORDS  # a document (a page, an answer) of fewer words is dropped
    decontaminate: Decontaminator | None = None  # set by `grow`: passages are checked before prompting


def locate(source: Source, paths: list | None = None) -> list[Path]:
    """Where `source` reads from: `paths` (`--source-path`) when given, else what it finds here.
    Fails, naming what to install, before any model is loaded or page read."""
    if paths:
        missing = [str(p) for p in paths if not Path(p).exists()]
        if missing:
            raise CorpusError(f"--source-path {missing[0]} does not exist")
        return [Path(p) for p in paths]
    if source.locate is None:
        return []
    found = source.locate()
    if not found:
        raise CorpusError(f"the {source.name!r} source found nothing on this machine: {source.install}, "
                          "then run again (or point --source-path at where it is)")
    return found


def search_path(variable: str, default: str) -> list[Path]:
    """The existing folders of a colon-separated `$variable` (e.g. MANPATH), else `default`."""
    named = [Path(p) for p in os.environ.get(variable, "").split(":") if p] or [Path(default)]
    return [p for p in named if p.is_dir()]


@lru_cache(maxsize=1)
def prompt_lists() -> dict[str, list[str]]:
    """The package's prompt data: held-out and chat topics and templates, reading tasks."""
    return json.loads((RESOURCES / "corpus" / "prompts.json").read_text(encoding="utf-8"))


def pack_paragraphs(pieces: list[str], max_chars: int) -> list[str]:
    """Consecutive pieces of text joined, paragraphs apart, into documents of at most about `max_chars`."""
    documents, current = [], ""
    for piece in pieces:
        if current and len(current) + len(piece) > max_chars:
            documents.append(current)
            current = ""
        current = f"{current}\n\n{piece}" if current else piece
    return documents + [current] if current else documents
