"""Downstream accuracy per exit, the paper's yardstick: every method at every depth from one pass.

`evaluate_downstream(model, ["table1"])` scores lm-eval tasks (offline ones from `balcony.evaluation.tasks`
or any lm-eval task) for the full model and, at every exit, for

* balcony: layers[:e] + balcony(e) + head (the trained sub-model);
* early exit: the base's final norm and head on the hidden state after layer e-1 (untrained);
* truncation: layers[:e+n] + final norm + head, n the layers per balcony (depth pruning at equal cost).

lm-eval builds the requests and scores the answers exactly as it does for any model; only the
language model is ours (`lm_eval_adapter.ExitSweepLM`): the first lm-eval run computes every
request once with one trunk pass per batch (`sweep.ExitSweep`, rows packed by `packing`), and
keeps every method's log-likelihoods; lm-eval's runs for the other methods read them back. So a
sweep of 3 exits x 3 methods + the full model costs about one pass over the data. The documents
come from `documents`, the table, JSON and plot from `downstream_report`.
"""

from __future__ import annotations

import importlib.util
import time

from ..core.errors import BalconyError
from ..core.model import BalconyModel
from .downstream_report import metric, table_report
from .documents import column_limits, subsample
from .tasks import TABLE1, TABLE1_CORE, expand, load_tasks, members


def evaluate_downstream(
    model: BalconyModel,
    tasks: list[str],
    *,
    limit: int | None = None,
    all_documents: bool = False,
    seed: int = 1234,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    batch_tokens: int = 4096,
    progress: bool = True,
) -> dict:
    """Accuracy per task for the full model and every method at every exit; see `downstream_report.table_report`.

    `tasks`: offline task names (`balcony.evaluation.tasks.TASKS`), the alias `table1`, `mmlu`, or any lm-eval
    task (found with `include_path` or among lm-eval's own, which may need the hub). `limit`: at
    most this many documents per task, a seeded random sample; without it the default caps apply
    (`DEFAULT_LIMITS`) unless `all_documents`.
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise BalconyError("downstream tasks need lm-evaluation-harness: pip install 'balcony[eval]' "
                           "(or pip install lm-eval)")
    from . import lm_eval_adapter as adapter

    columns = expand(tasks)
    if not columns:
        raise BalconyError("no tasks given: name lm-eval tasks or `table1`")
    began = time.perf_counter()
    loaded = load_tasks([n for c in columns for n in members(c)], include_path=include_path)
    if num_fewshot is not None:
        adapter.set_fewshot(loaded, num_fewshot)
    limits = column_limits(columns, limit, all_documents)
    samples = subsample({name: adapter.document_count(task) for name, task in loaded.items()}, columns, limits, seed)
    lm = adapter.ExitSweepLM(model, batch_tokens=batch_tokens, progress=progress)
    per_variant = adapter.evaluate_variants(lm, loaded, samples)
    # a column's figures are its tasks' means weighted by documents (MMLU: question-weighted over subjects)
    names = {c: [n for n in members(c) if n in loaded] for c in columns}
    counts = {c: sum(len(samples[n]) for n in names[c]) for c in columns}

    def weighted(column: str, value) -> float:
        return sum(value(n) * len(samples[n]) for n in names[column]) / counts[column]

    chance = {c: weighted(c, lambda n: adapter.chance_level(loaded[n], samples[n])) for c in columns}
    accuracy = {variant: {c: weighted(c, lambda n: adapter.metric_value(results, n, metric(c))) for c in columns}
                for variant, results in per_variant.items()}
    core = average_columns(columns)
    sampled = {c: counts[c] for c in columns if limits[c] is not None}
    return table_report(model, columns, core, accuracy, chance, counts, limit=limit, sampled=sampled, seed=seed,
                        seconds=time.perf_counter() - began, scoring_seconds=lm.sweep.scoring_seconds,
                        scored_tokens=lm.sweep.scored_tokens, requests=len(lm.sweep.scores))


def average_columns(columns: list[str]) -> list[str]:
    """The columns a table's average is over: the paper's five where all of `table1` is asked, else every one."""
    return [c for c in TABLE1_CORE if c in columns] if set(TABLE1) <= set(columns) else list(columns)
