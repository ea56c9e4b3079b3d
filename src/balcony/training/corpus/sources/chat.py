"""`chat`: the model's own answers to prompts on topics the shipped held-out text never uses.

The prompts are package data (`resources/corpus/prompts.json`), or, with `--source-path`, text
files of one prompt a line. `prompt_source` makes the same kind of source from any prompt list:
`balcony train --data self` samples through it with the held-out text's own prompts.
"""

from __future__ import annotations

from pathlib import Path

from ..answers import sample_answers
from ..source import Source, prompt_lists

CHAT_ROUNDS = 8


def held_out_prompts() -> list[str]:
    """The shipped held-out chats' prompts: every template over every held-out topic."""
    lists = prompt_lists()
    return [tpl.format(t=topic) for tpl in lists["held_out_templates"] for topic in lists["held_out_topics"]]


def chat_prompts(paths: list[Path]) -> list[str]:
    """The prompts of the files named (one a line), else the held-out templates and the chat ones
    over the chat topics."""
    if paths:
        return [line.strip() for path in paths for line in Path(path).read_text(encoding="utf-8").splitlines()
                if line.strip()]
    lists = prompt_lists()
    templates = lists["held_out_templates"] + lists["chat_templates"]
    return [tpl.format(t=topic) for tpl in templates for topic in lists["chat_topics"]]


def answer(batch: list[str], ctx) -> list[tuple[str, str]]:
    return sample_answers(ctx.model, ctx.tokenizer, batch, max_new_tokens=ctx.max_new_tokens,
                          temperature=ctx.temperature, top_p=ctx.top_p)


def prompt_source(name: str, prompts: list[str], rounds: int = CHAT_ROUNDS, batch: int = 16) -> Source:
    """A sampled source that answers `prompts`, each afresh in each of `rounds` rounds."""
    return Source(name, True, lambda paths: list(prompts), answer, batch=batch, rounds=rounds)


SOURCE = Source("chat", True, chat_prompts, answer, batch=16, rounds=CHAT_ROUNDS)
