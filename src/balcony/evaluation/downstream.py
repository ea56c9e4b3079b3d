"""Downstream accuracy per exit, the paper's yardstick: every method at every depth from one pass.

`evaluate_downstream(model, ["table1"])` scores lm-eval tasks (offline ones from `balcony.evaluation.tasks`
or any lm-eval task) for the full model and, at every exit, for

* balcony: layers[:e] + balcony(e) + head (the trained sub-model);
* early exit: the base's final norm and head on the hidden state after layer e-1 (untrained);
* truncation: layers[:e+n] + final norm + head, n the layers per balcony (depth pruning at equal cost).

lm-eval builds the requests and scores the answers exactly as it does for any model; only the
language model is ours (`ExitSweepLM`): the first lm-eval run computes every request once with
one trunk pass per batch (`forward_exits`), the head applied only where a continuation token is
scored, and keeps every method's log-likelihoods; lm-eval's runs for the other methods read them
back. So a sweep of 3 exits x 3 methods + the full model costs about one pass over the data.
"""

from __future__ import annotations

import logging
import math
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..core.errors import BalconyError
from ..core.exits import block_mask, takes_block_mask
from ..core.model import BalconyModel
from ..core.policy import FULL
from .tasks import DEFAULT_LIMITS, MMLU, TABLE1, TABLE1_CORE, expand, load_tasks, members, quiet_logger

METHODS = ("balcony", "early_exit", "truncation")
# lm-eval's accuracy; for HellaSwag the length-normalised one, as it is conventionally reported
# (its endings differ in length, and raw log-likelihood favours short ones: below chance on small models)
METRICS = {"hellaswag": "acc_norm"}


def metric(column: str) -> str:
    return METRICS.get(column, "acc")


@dataclass(frozen=True)
class Variant:
    """One row of the table: a method at an exit (the full model has no exit)."""

    method: str
    exit: int | None


def variants(model: BalconyModel) -> list[Variant]:
    return [Variant(FULL, None)] + [Variant(m, e) for e in model.exits for m in METHODS]


# ----------------------------------------------------------------------------- the language model


def _template_lm():
    try:
        from lm_eval.api.model import TemplateLM
    except ImportError:
        raise BalconyError("downstream tasks need lm-evaluation-harness: pip install 'balcony[eval]' "
                           "(or pip install lm-eval)") from None
    return TemplateLM


def make_sweep_lm(model: BalconyModel, *, batch_tokens: int = 4096, max_batch: int = 64, row_tokens: int = 2048,
                  packing: bool | None = None, progress: bool = True):
    """An lm-eval language model that scores every variant of `model` at once (see the module docstring).

    `packing` (default: where the base allows it) puts sequences that share a prefix into one row.
    """
    return type("ExitSweepLM", (ExitSweepMixin, _template_lm()), {})(
        model, batch_tokens=batch_tokens, max_batch=max_batch, row_tokens=row_tokens,
        packing=can_pack(model) if packing is None else packing, progress=progress)


class ExitSweepMixin:
    """lm-eval's `TemplateLM` interface (tokenization and request plumbing are lm-eval's own) over
    `BalconyModel.forward_exits`; `select(variant)` chooses whose log-likelihoods lm-eval receives."""

    backend = "causal"

    def __init__(self, model: BalconyModel, *, batch_tokens: int, max_batch: int, row_tokens: int, packing: bool,
                 progress: bool):
        super().__init__()
        if model.tokenizer is None:
            raise BalconyError("downstream tasks are text: this base has no tokenizer files; save one beside the model")
        self.model = model
        self.tokenizer = model.tokenizer
        self.variants = variants(model)
        self.batch_tokens, self.max_batch, self.row_tokens = batch_tokens, max_batch, row_tokens
        self.packing, self.progress = packing, progress
        self.selected = 0
        self.scores: dict[tuple, torch.Tensor] = {}  # (context ids, continuation ids) -> [variants, 2]
        config = model.base.config
        self.max_length = (getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
                           or 2048)
        self.scoring_seconds = 0.0
        self.scored_tokens = 0

    def select(self, variant: Variant) -> None:
        self.selected = self.variants.index(variant)

    # -- what TemplateLM asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        # like lm-eval's HF backend: an empty context is scored after BOS (else EOS)
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # like lm-eval's HF backend: the tokenizer's own special-token default, except after a literal BOS
        options = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        bos = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and bos and string.startswith(bos):
            options["add_special_tokens"] = False
        return self.tokenizer.encode(string, **options)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # lm-eval's tokenizing bar is noise beside ours, which `progress` switches
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        keys = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        todo = list(dict.fromkeys(k for k in keys if k not in self.scores))
        if todo:
            self._score(todo)
        return [(float(self.scores[k][self.selected, 0]), bool(self.scores[k][self.selected, 1])) for k in keys]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise BalconyError("perplexity tasks (loglikelihood_rolling) are not swept per exit: use `balcony eval --data` "
                           "for held-out text, or `python -m balcony.evaluation.harness --model balcony` for one exit")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise BalconyError("generation tasks are not swept per exit: run them at one exit with "
                           "`python -m balcony.evaluation.harness --model balcony --model_args artifact=...,exit_layer=E`")

    # -- scoring

    def _input(self, key: tuple) -> tuple[int, ...]:
        # as lm-eval's HF backend: the model reads context + continuation minus its last token,
        # left-truncated to the model's length
        context, continuation = key
        return (context + continuation)[-(self.max_length + 1):][:-1]

    def _score(self, keys: list[tuple]) -> None:
        """Log-likelihood and greedy flag of every key under every variant, into `self.scores`."""
        # requests that feed the model the same tokens share an input (e.g. MMLU's four one-letter answers)
        inputs: dict[tuple, list[tuple]] = {}
        for key in keys:
            inputs.setdefault(self._input(key), []).append(key)
        if self.packing:
            rows = [Row.pack(group) for group in group_by_prefix(sorted(inputs), self.row_tokens)]
        else:
            rows = [Row.pack([tokens]) for tokens in inputs]
        rows.sort(key=lambda row: len(row.tokens), reverse=True)  # longest first: little padding, pessimistic ETA
        batches, start = [], 0
        while start < len(rows):
            size = max(1, min(self.max_batch, self.batch_tokens // len(rows[start].tokens)))
            batches.append(rows[start:start + size])
            start += size
        total = sum(len(b[0].tokens) * len(b) for b in batches)
        began = time.perf_counter()
        with tqdm(total=total, desc=f"scoring {len(keys)} requests x {len(self.variants)} variants", unit="tok",
                  unit_scale=True, disable=not self.progress) as bar:
            for batch in batches:
                self._score_batch(batch, inputs)
                bar.update(len(batch[0].tokens) * len(batch))
        self.scoring_seconds += time.perf_counter() - began
        self.scored_tokens += sum(len(row.tokens) for row in rows)

    @torch.no_grad()
    def _score_batch(self, batch: list[Row], inputs: dict[tuple, list[tuple]]) -> None:
        model = self.model
        width = len(batch[0].tokens)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eot_token_id
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        for r, row in enumerate(batch):
            ids[r, : len(row.tokens)] = torch.tensor(row.tokens)
        if self.packing:
            positions = torch.zeros((len(batch), width), dtype=torch.long)
            for r, row in enumerate(batch):
                positions[r, : len(row.tokens)] = torch.tensor(row.positions)
            mask = _packed_mask(batch, width, model.base.config, model.dtype)
            out = model.forward_exits(ids.to(model.device), mask.to(model.device), baselines=True,
                                      position_ids=positions.to(model.device))
        else:
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for r, row in enumerate(batch):
                mask[r, : len(row.tokens)] = 1
            out = model.forward_exits(ids.to(model.device), mask.to(model.device), baselines=True)
        hidden = {Variant(FULL, None): out.teacher_hidden}
        for e in model.exits:
            hidden[Variant("balcony", e)] = out.hidden[e]
            hidden[Variant("early_exit", e)] = out.early_exit[e]
            hidden[Variant("truncation", e)] = out.truncation[e]

        # every scored token: its row, the row position that predicts it, its id; the head runs only there
        where, targets, spans = [], [], []
        for r, row in enumerate(batch):
            for tokens, index in zip(row.members, row.index):
                for key in inputs[tokens]:
                    k = len(key[1])
                    spans.append((key, len(targets), len(targets) + k))
                    where.extend((r, index[t]) for t in range(len(tokens) - k, len(tokens)))
                    targets.extend(key[1])
        rows_at = torch.tensor([w[0] for w in where], device=model.device)
        cols_at = torch.tensor([w[1] for w in where], device=model.device)
        targets = torch.tensor(targets)
        scores = torch.zeros(len(spans), len(self.variants), 2)
        for v, variant in enumerate(self.variants):
            logprobs = torch.log_softmax(model.logits(hidden[variant][rows_at, cols_at]).float(), dim=-1).cpu()
            picked = logprobs.gather(-1, targets[:, None])[:, 0]
            hit = (logprobs.argmax(-1) == targets).float()
            for i, (_, a, b) in enumerate(spans):
                scores[i, v, 0] = picked[a:b].sum()
                scores[i, v, 1] = hit[a:b].min()
        for i, (key, _, _) in enumerate(spans):
            self.scores[key] = scores[i]


@dataclass
class Row:
    """One model input holding several sequences that share a prefix: the prefix once, then each
    sequence's remainder, which sees the prefix and itself only (own positions, a block mask)."""

    tokens: list[int]
    positions: list[int]
    segments: list[int]  # 0: the shared prefix; i: the remainder of member i
    members: list[tuple]
    index: list[list[int]]  # member -> the row position of each of its tokens

    @classmethod
    def pack(cls, members: list[tuple]) -> Row:
        shared = _common_prefix_length(members)
        if len(members) == 1:
            shared = len(members[0])
        tokens, positions, segments = list(members[0][:shared]), list(range(shared)), [0] * shared
        index = []
        for m, member in enumerate(members, start=1):
            start = len(tokens)
            tokens.extend(member[shared:])
            positions.extend(range(shared, len(member)))
            segments.extend([m] * (len(member) - shared))
            index.append(list(range(shared)) + list(range(start, start + len(member) - shared)))
        return cls(tokens, positions, segments, members, index)


def group_by_prefix(inputs: list[tuple], row_tokens: int, min_shared: int = 8) -> list[list[tuple]]:
    """Sorted inputs grouped so that each group's common prefix is worth sharing (the choices of one
    question, MMLU's few-shot examples) and a packed group stays within `row_tokens`."""
    groups: list[list[tuple]] = []
    prefix = 0
    for tokens in inputs:
        if groups:
            group = groups[-1]
            shared = _common_prefix_length([group[0], tokens])
            shared = min(shared, prefix) if len(group) > 1 else shared
            packed = shared + sum(len(t) - shared for t in group) + len(tokens) - shared
            if shared >= min_shared and (len(group) == 1 or 2 * shared >= prefix) and packed <= row_tokens:
                group.append(tokens)
                prefix = shared
                continue
        groups.append([tokens])
        prefix = len(tokens)
    return groups


def _common_prefix_length(sequences: list[tuple]) -> int:
    first, n = sequences[0], min(len(s) for s in sequences)
    for i in range(n):
        if any(s[i] != first[i] for s in sequences[1:]):
            return i
    return n


def _packed_mask(batch: list[Row], width: int, config, dtype: torch.dtype) -> torch.Tensor:
    """[batch, 1, width, width]: causal, and a remainder sees the shared prefix and itself only.
    Padding attends to itself (a row that sees nothing would give NaN); nothing reads it."""
    allowed = torch.zeros((len(batch), 1, width, width), dtype=torch.bool)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    for r, row in enumerate(batch):
        n = len(row.tokens)
        seg = torch.tensor(row.segments)
        visible = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
        allowed[r, 0, :n, :n] = visible & causal[:n, :n]
        allowed[r, 0, n:, n:] = torch.eye(width - n, dtype=torch.bool)
    return block_mask(allowed, config, dtype)


def can_pack(model: BalconyModel) -> bool:
    """Whether rows may pack sequences behind a custom mask: not where sliding windows would need
    building into it, and only for attention kinds that take a 4-D mask (sdpa, eager)."""
    return takes_block_mask(model.base.config)


# ----------------------------------------------------------------------------- the sweep


def column_limits(columns: list[str], limit: int | None, all_documents: bool = False) -> dict[str, int | None]:
    """Documents per column: `limit` for every column, else the default caps (`DEFAULT_LIMITS`), else all."""
    if limit is not None and limit < 1:
        raise BalconyError(f"--limit must be a positive number of documents per task, not {limit}")
    if limit is not None and all_documents:
        raise BalconyError("give --limit or --all-documents, not both")
    if limit is not None:
        return {c: limit for c in columns}
    return {c: None if all_documents else DEFAULT_LIMITS.get(c) for c in columns}


def subsample(tasks: dict, columns: list[str], limits: dict[str, int | None], seed: int = 1234) -> dict[str, list[int]]:
    """Document indices per task: all of them, or a column's limit drawn at random (seeded).

    A column of several tasks (`mmlu`: 57 subjects) spreads its limit evenly over them, at least one each.
    """
    samples = {}
    for column in columns:
        names = [n for n in members(column) if n in tasks]
        for name in names:
            if len(tasks[name].eval_docs) == 0:
                raise BalconyError(f"task {name!r} has no documents to evaluate: check its data files")
        if limits.get(column) is None:
            samples.update({name: list(range(len(tasks[name].eval_docs))) for name in names})
            continue
        per_task = max(1, math.ceil(limits[column] / len(names)))
        for name in names:
            count = len(tasks[name].eval_docs)
            picked = random.Random(f"{seed}:{name}").sample(range(count), min(per_task, count))
            samples[name] = sorted(picked)
    return samples


def chance_level(task, indices: list[int]) -> float:
    """The accuracy of a uniform guess over the evaluated documents (0 for tasks without choices, e.g. LAMBADA)."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return 0.0
    docs = task.eval_docs
    return sum(1.0 / len(task.doc_to_choice(docs[i])) for i in indices) / len(indices)


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
    """Accuracy per task for the full model and every method at every exit; see `table_report`.

    `tasks`: offline task names (`balcony.evaluation.tasks.TASKS`), the alias `table1`, `mmlu`, or any lm-eval
    task (found with `include_path` or among lm-eval's own, which may need the hub). `limit`: at
    most this many documents per task, a seeded random sample; without it the default caps apply
    (`DEFAULT_LIMITS`) unless `all_documents`.
    """
    _template_lm()  # fails with the install hint when lm-eval is missing
    from lm_eval.evaluator import evaluate as lm_eval_evaluate

    columns = expand(tasks)
    if not columns:
        raise BalconyError("no tasks given: name lm-eval tasks or `table1`")
    began = time.perf_counter()
    loaded = load_tasks([n for c in columns for n in members(c)], include_path=include_path)
    if num_fewshot is not None:
        for task in loaded.values():
            task.set_config(key="num_fewshot", value=num_fewshot)
    limits = column_limits(columns, limit, all_documents)
    samples = subsample(loaded, columns, limits, seed)
    lm = make_sweep_lm(model, batch_tokens=batch_tokens, progress=progress)
    per_variant = {}
    with _quiet_lm_eval(), _requests_built_once(loaded):
        for variant in lm.variants:
            lm.select(variant)
            per_variant[variant] = lm_eval_evaluate(lm, {"tasks": loaded, "groups": {}, "group_map": {}},
                                                    samples=samples, bootstrap_iters=0, log_samples=False)
    # a column's figures are its tasks' means weighted by documents (MMLU: question-weighted over subjects)
    names = {c: [n for n in members(c) if n in loaded] for c in columns}
    counts = {c: sum(len(samples[n]) for n in names[c]) for c in columns}

    def weighted(column: str, value) -> float:
        return sum(value(n) * len(samples[n]) for n in names[column]) / counts[column]

    chance = {c: weighted(c, lambda n: chance_level(loaded[n], samples[n])) for c in columns}
    accuracy = {variant: {c: weighted(c, lambda n: out["results"][n][f"{metric(c)},none"]) for c in columns}
                for variant, out in per_variant.items()}
    core = [c for c in TABLE1_CORE if c in columns] if set(TABLE1) <= set(columns) else columns
    sampled = {c: counts[c] for c in columns if limits[c] is not None}
    return table_report(model, columns, core, accuracy, chance, counts, limit=limit, sampled=sampled, seed=seed,
                        seconds=time.perf_counter() - began, scoring_seconds=lm.scoring_seconds,
                        scored_tokens=lm.scored_tokens, requests=len(lm.scores))


@contextmanager
def _requests_built_once(tasks: dict):
    """lm-eval rebuilds every request (a Jinja render per document) on each `evaluate`; the requests
    are the same for every variant, so from the second run on each task keeps its own and only
    forgets the previous variant's answers."""

    def reuse(task, build):
        built = []

        def build_all_requests(*args, **kwargs):
            if not built:
                build(*args, **kwargs)
                built.append(True)
                return
            for instance in task.instances:
                instance.resps.clear()
                instance.filtered_resps.clear()

        return build_all_requests

    for task in tasks.values():
        task.build_all_requests = reuse(task, task.build_all_requests)
    try:
        yield
    finally:
        for task in tasks.values():
            del task.build_all_requests  # back to the class's method


@contextmanager
def _quiet_lm_eval():
    """lm-eval draws a bar per task while it builds requests: 10 variants x 63 tasks of them. Ours is enough."""
    import lm_eval.api.task as task_module

    saved = task_module.tqdm
    task_module.tqdm = partial(saved, disable=True)
    try:
        with quiet_logger("lm_eval", logging.WARNING):
            yield
    finally:
        task_module.tqdm = saved


def table_report(model: BalconyModel, columns: list[str], core: list[str], accuracy: dict, chance: dict, counts: dict,
                 **extra) -> dict:
    """The table as JSON: one row per variant with its average over `core`, kept %, above-chance kept %."""
    full = accuracy[Variant(FULL, None)]
    full_average = sum(full[c] for c in core) / len(core)
    chance_average = sum(chance[c] for c in core) / len(core)
    costs = variant_costs(model)
    rows = []
    for variant, acc in accuracy.items():
        average = sum(acc[c] for c in core) / len(core)
        rows.append({
            "method": variant.method,
            "exit": variant.exit,
            "cost": costs[variant],
            "accuracy": {c: acc[c] for c in columns},
            "average": average,
            "kept": kept(average, full_average),
            "kept_above_chance": kept(average, full_average, chance_average),
        })
    return {
        "tasks": columns,
        "average_of": core,
        "limit": extra.pop("limit"),
        "documents": counts,
        "chance": chance,
        "stderr": {c: math.sqrt(full[c] * (1 - full[c]) / counts[c]) for c in columns},
        "average_stderr": math.sqrt(sum(full[c] * (1 - full[c]) / counts[c] for c in core)) / len(core),
        "cost_source": costs["source"],
        "metric": {c: metric(c) for c in columns},
        "rows": rows,
        **extra,
    }


def kept(value: float, full: float, chance: float = 0.0) -> float:
    """The share of the full model's score (above `chance`) that `value` keeps."""
    if full - chance <= 0:
        return float("nan")  # the full model itself is at chance: nothing to keep
    return (value - chance) / (full - chance)


def variant_costs(model: BalconyModel) -> dict:
    """Per-token cost of each variant relative to the full model, and where the figures come from.

    With a speed profile (`balcony bench`, batch-1 decode) the balcony's cost is measured;
    truncation runs the same number of layers, so it costs the same; early exit runs n layers
    fewer (n per balcony) and is scaled from the balcony's measured figure by the FLOP model.
    Without a profile, all come from the FLOP model.
    """
    measured = (model.profile or {}).get("ms_per_token") or {}
    costs: dict = {Variant(FULL, None): 1.0, "source": "measured" if measured else "flops"}
    for e in model.exits:
        flops = model.relative_cost(e)
        balcony = measured[str(e)] / measured[FULL] if measured.get(str(e)) and measured.get(FULL) else flops
        early_flops = model.flops_at_depth(e) / model.flops_per_token(None)  # layers[:e] and the head
        costs[Variant("balcony", e)] = costs[Variant("truncation", e)] = balcony
        costs[Variant("early_exit", e)] = balcony * early_flops / flops
    return costs


# ----------------------------------------------------------------------------- output


_SHORT = {"arc_easy": "ARC-E", "arc_challenge": "ARC-C", "lambada_openai": "LAMBADA", "piqa": "PIQA",
          "winogrande": "WinoG", "hellaswag": "HellaS", MMLU: "MMLU"}


def format_table(report: dict) -> str:
    """The paper's table in plain text: accuracy per task, average, difference, kept %, above-chance kept %."""
    columns, core = report["tasks"], report["average_of"]
    extra = [c for c in columns if c not in core]
    names = [_SHORT.get(c, c) for c in core] + ["avg", "diff", "kept", ">chance"] + [_SHORT.get(c, c) for c in extra]
    widths = [max(7, len(n)) for n in names]
    head = f"{'method':<11} {'exit':>4} {'cost':>5} | " + " ".join(n.rjust(w) for n, w in zip(names, widths))
    lines = [head, "-" * len(head)]
    full = next(r for r in report["rows"] if r["method"] == FULL)
    for row in report["rows"]:
        cells = [100 * row["accuracy"][c] for c in core]
        cells += [100 * row["average"], 100 * (row["average"] - full["average"]), 100 * row["kept"],
                  100 * row["kept_above_chance"]]
        cells += [100 * row["accuracy"][c] for c in extra]
        text = [f"{v:+.1f}" if i == len(core) + 1 else f"{v:.1f}" for i, v in enumerate(cells)]
        exit_text = "-" if row["exit"] is None else str(row["exit"])
        lines.append(f"{row['method']:<11} {exit_text:>4} {row['cost']:>5.2f} | "
                     + " ".join(t.rjust(w) for t, w in zip(text, widths)))
    docs = ", ".join(f"{_SHORT.get(c, c)} {report['documents'][c]}" for c in columns)
    stderr = ", ".join(f"{_SHORT.get(c, c)} {100 * report['stderr'][c]:.1f}" for c in columns)
    lines.append("")
    norm = [_SHORT.get(c, c) for c in columns if report["metric"][c] != "acc"]
    lines.append("accuracy in % (acc" + (f"; acc_norm for {', '.join(norm)}" if norm else "")
                 + f"); avg over {', '.join(_SHORT.get(c, c) for c in core)}; "
                 f"kept = avg / full avg; >chance = (avg - chance) / (full avg - chance), chance avg "
                 f"{100 * sum(report['chance'][c] for c in core) / len(core):.1f}")
    sampled = report.get("sampled") or {}
    if sampled:
        which = "every task" if len(sampled) == len(columns) else ", ".join(_SHORT.get(c, c) for c in sampled)
        sample = f"{which}: a seeded random sample" + (" (MMLU: spread evenly over its 57 subjects)"
                                                         if MMLU in sampled else "")
        sample += "" if len(sampled) == len(columns) else "; the rest: all documents"
    else:
        sample = "all documents"
    lines.append(f"documents ({sample}): {docs}")
    lines.append(f"standard error of the full model's accuracy, points: {stderr}; of its average: "
                 f"{100 * report['average_stderr']:.1f}")
    lines.append(f"cost: per-token cost relative to the full model ({report['cost_source']}"
                 + (", batch-1 decode profile from `balcony bench`" if report["cost_source"] == "measured" else "") + ")")
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """Average accuracy against cost per exit: the three methods and the full model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    styles = {"balcony": ("tab:blue", "o"), "early_exit": ("tab:red", "s"), "truncation": ("tab:orange", "^")}
    for method, (color, marker) in styles.items():
        rows = sorted((r for r in report["rows"] if r["method"] == method), key=lambda r: r["cost"])
        ax.plot([r["cost"] for r in rows], [100 * r["average"] for r in rows], marker=marker, color=color,
                label=method.replace("_", " "))
        for r in rows:
            ax.annotate(str(r["exit"]), (r["cost"], 100 * r["average"]), textcoords="offset points", xytext=(4, -10),
                        fontsize=8, color=color)
    full = next(r for r in report["rows"] if r["method"] == FULL)
    ax.plot([full["cost"]], [100 * full["average"]], marker="*", markersize=14, color="black", linestyle="none",
            label="full model")
    chance = 100 * sum(report["chance"][c] for c in report["average_of"]) / len(report["average_of"])
    ax.axhline(chance, color="grey", linestyle=":", label="chance")
    ax.set_xlabel(f"per-token cost relative to the full model ({report['cost_source']})")
    ax.set_ylabel("average accuracy, %")
    count = sum(report["documents"][c] for c in report["average_of"])
    tasks = ", ".join(_SHORT.get(c, c) for c in report["average_of"])
    ax.set_title(f"Downstream accuracy per exit: average of {tasks}\n({count} documents)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["evaluate_downstream", "format_table", "plot", "variants", "Variant", "kept"]
