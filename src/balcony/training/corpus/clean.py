"""Keeping evaluation text out of training: every paragraph that shares a run of `NGRAM` words
with a text balconies are measured on is dropped.

The texts: the shipped held-out chats and held-out docstrings (package data, on every machine),
plus `HELD_OUT_FILES`, files of the system that evaluations read, by default the GPL-3 licence
(`balcony eval --data /usr/share/common-licenses/GPL-3`). `balcony corpus --held-out PATH` names
others; a named file that is missing is an error, not a silent gap in the check.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

from ...default import RESOURCES, heldout_texts, jsonl_texts
from .store import CorpusError

NGRAM = 13  # words in a run shared with an evaluation text that marks a paragraph contaminated
HELDOUT_DOCSTRINGS = RESOURCES / "corpus" / "heldout-docstrings.jsonl"  # packages no training run read
# Debian's copy of the licence (package base-files): English legal prose that manuals quote
HELD_OUT_FILES = ("/usr/share/common-licenses/GPL-3",)


class Decontaminator:
    """Drops every paragraph that shares a run of `n` words with an evaluation text."""

    def __init__(self, texts: list[str], n: int = NGRAM):
        self.n = n
        self.grams = {g for text in texts for g in self.grams_of(text)}
        self.dropped = 0  # paragraphs dropped so far

    def grams_of(self, text: str) -> Iterator[int]:
        words = re.findall(r"\w+", text.lower())
        for i in range(len(words) - self.n + 1):
            yield hash(" ".join(words[i:i + self.n]))

    def clean(self, text: str) -> tuple[str, int]:
        """The text without contaminated paragraphs, and how many were dropped."""
        kept, dropped = [], 0
        for paragraph in re.split(r"\n\s*\n", text):
            if any(g in self.grams for g in self.grams_of(paragraph)):
                dropped += 1
            else:
                kept.append(paragraph)
        self.dropped += dropped
        return "\n\n".join(kept), dropped


def evaluation_texts(files: list[str] | tuple[str, ...] | None = HELD_OUT_FILES) -> list[str]:
    """The texts balconies are measured on, never to be trained on: the shipped held-out texts
    and `files` (default `HELD_OUT_FILES`; None or empty: the shipped ones only)."""
    texts = heldout_texts() + jsonl_texts(HELDOUT_DOCSTRINGS)
    for name in files or ():
        path = Path(name)
        if not path.is_file():
            hint = " (Debian's base-files package ships it)" if str(path) in HELD_OUT_FILES else ""
            raise CorpusError(f"held-out text {path} is missing{hint}: install it, or name the texts you "
                              "evaluate on with --held-out PATH (--held-out none: the shipped held-out texts only)")
        texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts
