"""Which documents the downstream table scores: every one, or a seeded random sample per column.

A sample is drawn from the task's name and the seed alone, so every run, model and variant scores
the same documents, and a recipe can pick documents the table never sees.
"""

from __future__ import annotations

import math
import random

from ..core.errors import BalconyError
from .tasks import DEFAULT_LIMITS, members


def column_limits(columns: list[str], limit: int | None, all_documents: bool = False) -> dict[str, int | None]:
    """Documents per column: `limit` for every column, else the default caps (`DEFAULT_LIMITS`), else all."""
    if limit is not None and limit < 1:
        raise BalconyError(f"--limit must be a positive number of documents per task, not {limit}")
    if limit is not None and all_documents:
        raise BalconyError("give --limit or --all-documents, not both")
    if limit is not None:
        return {c: limit for c in columns}
    return {c: None if all_documents else DEFAULT_LIMITS.get(c) for c in columns}


def subsample(sizes: dict[str, int], columns: list[str], limits: dict[str, int | None],
              seed: int = 1234) -> dict[str, list[int]]:
    """Document indices per task, given each task's number of documents (`sizes`): all of them, or
    a column's limit drawn at random (seeded).

    A column of several tasks (`mmlu`: 57 subjects) spreads its limit evenly over them, at least one each.
    """
    samples = {}
    for column in columns:
        names = [n for n in members(column) if n in sizes]
        for name in names:
            if sizes[name] == 0:
                raise BalconyError(f"task {name!r} has no documents to evaluate: check its data files")
        if limits.get(column) is None:
            samples.update({name: list(range(sizes[name])) for name in names})
            continue
        per_task = max(1, math.ceil(limits[column] / len(names)))
        for name in names:
            count = sizes[name]
            picked = random.Random(f"{seed}:{name}").sample(range(count), min(per_task, count))
            samples[name] = sorted(picked)
    return samples
