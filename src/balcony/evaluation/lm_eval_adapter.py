"""Everything balcony asks of lm-evaluation-harness, in one place.

lm-eval builds the requests and scores the answers exactly as it does for any model; balcony
brings the language models, registered as lm-eval's model types:

* `balcony-sweep` (`ExitSweepLM`): every variant of a model at once, over an `ExitSweep`. The
  first `evaluate` computes every request for every variant; lm-eval's runs for the other
  variants read the scores back (`evaluate_variants`). It takes a loaded `BalconyModel`
  (`simple_evaluate(model="balcony-sweep", model_args={"model": balcony_model})`).
* `balcony` (`BalconyLM`): one exit through lm-eval's own Hugging Face backend, so rolling
  perplexity and generation tasks work too (`balcony-lm-eval`, `balcony.evaluation.harness`).

Beside them: lm-eval's built-in task configs re-pointed at other data (`mirror_builtin`), task
loading, and the few task attributes the table reads. Each thing relied on here that lm-eval
could change has a test in tests/test_lm_eval_adapter.py that names it.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from functools import lru_cache, partial
from pathlib import Path
from unittest import mock

import lm_eval.api.task
import lm_eval.tasks
from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.evaluator import evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from lm_eval.tasks._index import TaskIndex
from lm_eval.tasks._yaml_loader import load_yaml

from ..core.errors import BalconyError, ExitError
from ..core.model import BalconyModel
from ..core.policy import DepthRequest
from .sweep import ExitSweep, Variant

LOGGER = "lm_eval"  # the logger lm-eval's modules log under


@contextmanager
def quiet_logger(name: str = LOGGER, level: int = logging.ERROR):
    """A logger at `level` for a block (lm-eval warns about things that are expected here)."""
    logger = logging.getLogger(name)
    saved = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(saved)


# ----------------------------------------------------------------------------- tasks


# lm-eval's folders that hold the built-ins mirrored by `balcony.evaluation.tasks`: indexing them
# takes milliseconds, indexing all of lm-eval's tasks about 15 s
BUILTIN_FOLDERS = ("arc", "lambada", "piqa", "winogrande", "hellaswag", "mmlu/default", "super_glue/boolq",
                   "super_glue/copa", "commonsense_qa", "sciq", "openbookqa", "siqa")


@lru_cache(maxsize=1)
def _builtin_index() -> dict:
    root = Path(lm_eval.tasks.__file__).parent
    with quiet_logger():  # super_glue's shared group files "override" each other: harmless noise
        return TaskIndex().build([root / folder for folder in BUILTIN_FOLDERS if (root / folder).is_dir()])


def mirror_builtin(builtin: str, name: str, loader, loader_kwargs: dict, *, split: str, fewshot_split: str | None,
                   num_fewshot: int = 0) -> dict:
    """lm-eval's built-in task `builtin` as a task config named `name` whose documents come from
    `loader(**loader_kwargs)` (a DatasetDict): prompts, targets and metrics unchanged."""
    entry = _builtin_index().get(builtin)
    if entry is None or entry.yaml_path is None:
        raise BalconyError(f"lm-eval has no built-in task {builtin!r} to mirror: upgrade lm-eval (>=0.4.5)")
    config = dict(load_yaml(entry.yaml_path, resolve_func=True))
    for key in ("tag", "group", "task_list"):  # the mirror joins none of the built-in's groups
        config.pop(key, None)
    config.update(task=name, dataset_path=None, dataset_name=None, custom_dataset=loader, dataset_kwargs=loader_kwargs,
                  test_split=split, validation_split=None, training_split=None, fewshot_split=fewshot_split)
    if num_fewshot:
        config["num_fewshot"] = num_fewshot
    return config


def build_tasks(specs: list, include_path: str | None = None) -> dict:
    """lm-eval Task objects, {name: Task}, from task configs (dicts) and lm-eval task names."""
    # lm-eval warns once per task that a custom data set could take --metadata: noise here
    with quiet_logger():
        # lm-eval's own tasks are indexed (slow) only when a name may be one of them: not when every
        # name is a plain task of `include_path` (which would take precedence over a built-in anyway)
        names = {spec for spec in specs if isinstance(spec, str)}
        if include_path is not None and names <= set(_task_manager(include_path, False).all_subtasks):
            return _task_manager(include_path, False).load(specs)["tasks"]
        everything = include_path is not None or bool(names)
        return _task_manager(include_path, everything).load(specs)["tasks"]


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None, everything: bool) -> TaskManager:
    # indexing every lm-eval task takes 15 s: once per process (a sweep per method, per task, reuses it);
    # each `load` still makes new Task objects
    return TaskManager(include_path=include_path, include_defaults=everything)


def set_fewshot(tasks: dict, num_fewshot: int) -> None:
    for task in tasks.values():
        task.set_config(key="num_fewshot", value=num_fewshot)


def document_count(task) -> int:
    """The documents the task evaluates."""
    return len(task.eval_docs)


def chance_level(task, indices: list[int]) -> float:
    """The accuracy of a uniform guess over the evaluated documents (0 for tasks without choices, e.g. LAMBADA)."""
    if task.OUTPUT_TYPE != "multiple_choice":
        return 0.0
    docs = task.eval_docs
    return sum(1.0 / len(task.doc_to_choice(docs[i])) for i in indices) / len(indices)


# ----------------------------------------------------------------------------- every variant at once


@register_model("balcony-sweep")
class ExitSweepLM(TemplateLM):
    """lm-eval's `TemplateLM` (tokenization and request plumbing are lm-eval's own) over an
    `ExitSweep`; `select(variant)` chooses whose log-likelihoods lm-eval receives."""

    backend = "causal"  # how TemplateLM splits context and continuation tokens

    def __init__(self, model: BalconyModel, *, batch_tokens: int = 4096, max_batch: int = 64, row_tokens: int = 2048,
                 packing: bool | None = None, progress: bool = True):
        super().__init__()
        self.sweep = ExitSweep(model, batch_tokens=batch_tokens, max_batch=max_batch, row_tokens=row_tokens,
                               packing=packing, progress=progress)
        self.tokenizer = model.tokenizer
        self.selected = 0

    def select(self, variant: Variant) -> None:
        self.selected = self.sweep.variants.index(variant)

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
        # lm-eval's tokenizing bar is noise beside the sweep's, which `progress` switches
        return super().loglikelihood(requests, disable_tqdm=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        keys = [(tuple(context), tuple(continuation)) for _, context, continuation in requests]
        self.sweep.score(keys)
        return [self.sweep.result(key, self.selected) for key in keys]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        raise BalconyError("perplexity tasks (loglikelihood_rolling) are not swept per exit: use `balcony eval --data` "
                           "for held-out text, or `python -m balcony.evaluation.harness --model balcony` for one exit")

    def generate_until(self, requests, disable_tqdm: bool = False):
        raise BalconyError("generation tasks are not swept per exit: run them at one exit with "
                           "`python -m balcony.evaluation.harness --model balcony --model_args artifact=...,exit_layer=E`")


def evaluate_variants(lm: ExitSweepLM, tasks: dict, samples: dict[str, list[int]]) -> dict[Variant, dict]:
    """lm-eval's `evaluate` over `tasks` and the sampled documents once per variant: {variant: its results}."""
    out = {}
    with _requests_built_once(tasks), quiet_logger(level=logging.WARNING):
        for variant in lm.sweep.variants:
            lm.select(variant)
            out[variant] = evaluate(lm, {"tasks": tasks, "groups": {}, "group_map": {}}, samples=samples,
                                    bootstrap_iters=0, log_samples=False)["results"]
    return out


def metric_value(results: dict, task: str, metric: str) -> float:
    """A task's metric in `evaluate`'s results, which key it by filter ("none": these tasks filter nothing)."""
    return results[task][f"{metric},none"]


@contextmanager
def _requests_built_once(tasks: dict):
    """lm-eval rebuilds every request (a Jinja render per document) on each `evaluate` and draws a
    bar per task as it does: 10 variants x 63 tasks of them. The requests are the same for every
    variant, so from the second run on each task keeps its own and only forgets the previous
    variant's answers; the sweep's own bar is enough.

    `evaluate` takes no argument for either (`cache_requests` pickles the requests into lm-eval's
    cache folder and reads them back each run, and still draws the bars), so both are patched for
    the block: each task's `build_all_requests` on the instance (its class is untouched), and the
    `tqdm` that `lm_eval.api.task` draws with.
    """

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

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(lm_eval.api.task, "tqdm", partial(lm_eval.api.task.tqdm, disable=True)))
        for task in tasks.values():
            stack.enter_context(mock.patch.object(task, "build_all_requests", reuse(task, task.build_all_requests)))
        yield


# ----------------------------------------------------------------------------- one exit


@register_model("balcony")
class BalconyLM(HFLM):
    """lm-eval's Hugging Face backend on one exit's sub-model (an object of the base's own class).

    `model_args` take `artifact` (or `model` for fresh balconies on a base), `exit_layer` (a
    number or `full`) or `budget`, and any `HFLM` option (batch_size, max_length, ...).
    """

    def __init__(
        self,
        artifact: str | None = None,
        exit_layer: int | str | None = None,
        budget: float | str | None = None,
        model: str | None = None,
        verify_base: bool = True,
        balcony_model: BalconyModel | None = None,
        **kwargs,
    ):
        if balcony_model is None:
            if artifact:
                balcony_model = BalconyModel.from_pretrained(artifact, base=model, verify_base=verify_base)
            else:
                balcony_model = BalconyModel.from_base(model)
        self.balcony = balcony_model
        # model_args arrive as text: "15", "full", "0.7"
        budget = None if budget is None else _number(budget, "budget")
        self.exit_layer = balcony_model.policy.resolve(DepthRequest(exit_layer, budget))
        # lm-eval sees an ordinary causal LM whose layer list ends in the balcony: the exit model,
        # which shares the base's weights and leaves the BalconyModel free for anything else
        kwargs.setdefault("backend", "causal")
        super().__init__(pretrained=balcony_model.exit_model(self.exit_layer), tokenizer=balcony_model.tokenizer, **kwargs)


def _number(text: float | str, name: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ExitError(f"{name} must be a number, not {text!r}") from None


def command_line() -> None:
    """lm-eval's own command line, with the model types above registered."""
    cli_evaluate()
