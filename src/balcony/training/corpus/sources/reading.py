"""`reading`: a passage of a manual page, then a task about it (summarise it, answer questions from
it, explain it), then the model's answer: long contexts whose continuation depends on reading
them, which short prompt-answer pairs do not teach a balcony's one attention layer."""

from __future__ import annotations

from pathlib import Path

from ..source import Source, prompt_lists
from . import man
from .chat import answer

PASSAGE_CHARS = 1800  # about 400-500 tokens of a manual before the task


def tasks(paths: list[Path]) -> list[tuple[str, int]]:
    """(a man page, which task) for every page, the tasks taken in turn."""
    count = len(prompt_lists()["reading_tasks"])
    return [(page, i % count) for i, page in enumerate(man.man_pages(paths))]


def passage(path: str) -> str:
    """About PASSAGE_CHARS of a man page, from its description on, cut at a paragraph end."""
    text = man.render_man(path)
    at = text.find("DESCRIPTION")
    text = text[at:] if at >= 0 else text
    paragraphs, out = text.split("\n\n"), ""
    for paragraph in paragraphs:
        if out and len(out) + len(paragraph) > PASSAGE_CHARS:
            break
        out = f"{out}\n\n{paragraph}" if out else paragraph
    return out.strip()


def read_and_answer(batch: list[tuple[str, int]], ctx) -> list[tuple[str, str]]:
    messages = []
    for path, task in batch:
        text = passage(path)
        if ctx.decontaminate is not None:  # the passage goes into the prompt, which is kept as it is
            text = ctx.decontaminate.clean(text)[0]
        if len(text.split()) >= ctx.min_words:
            messages.append(f"{text}\n\n{prompt_lists()['reading_tasks'][task]}")
    if not messages:
        return []
    return answer(messages, ctx)


SOURCE = Source("reading", True, tasks, read_and_answer, batch=8, install=man.INSTALL, locate=man.locate)
