"""What balcony relies on in lm-evaluation-harness, checked against the installed version.

Each lm-eval attribute that `balcony.evaluation.lm_eval_adapter` uses has a check here; when an
lm-eval release moves or changes one, the failure names it and what balcony expects of it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
from pathlib import Path

import pytest
from conftest import tiny_base, tiny_tokenizer

pytest.importorskip("lm_eval")

import lm_eval  # noqa: E402
import lm_eval.api.task  # noqa: E402
import lm_eval.tasks  # noqa: E402

from balcony import BalconyModel  # noqa: E402
from balcony.evaluation import lm_eval_adapter as adapter  # noqa: E402
from balcony.evaluation.sweep import Variant  # noqa: E402


def relies(condition: bool, attribute: str, what: str) -> None:
    assert condition, f"lm-eval {lm_eval.__version__} changed `{attribute}`: balcony relies on {what}"


def parameters(function) -> dict:
    return inspect.signature(function).parameters


# ----------------------------------------------------------------------------- the model types


def test_template_lm_asks_for_what_the_sweep_provides():
    from lm_eval.api.model import TemplateLM

    provided = {"eot_token_id", "tok_encode", "_loglikelihood_tokens", "loglikelihood_rolling", "generate_until"}
    relies(set(TemplateLM.__abstractmethods__) <= provided, "lm_eval.api.model.TemplateLM.__abstractmethods__",
           f"ExitSweepLM implementing every abstract method (it implements {sorted(provided)}; lm-eval asks "
           f"{sorted(TemplateLM.__abstractmethods__)})")
    relies(not adapter.ExitSweepLM.__abstractmethods__, "lm_eval.api.model.TemplateLM",
           "ExitSweepLM being instantiable")
    relies("disable_tqdm" in parameters(TemplateLM.loglikelihood), "TemplateLM.loglikelihood(requests, disable_tqdm)",
           "the `disable_tqdm` argument, to hide lm-eval's tokenizing bar")
    relies("self._loglikelihood_tokens(" in inspect.getsource(TemplateLM.loglikelihood), "TemplateLM.loglikelihood",
           "it tokenizing the requests and handing (args, context ids, continuation ids) to `_loglikelihood_tokens`")
    relies("requests" in parameters(TemplateLM._loglikelihood_tokens), "TemplateLM._loglikelihood_tokens(requests)",
           "the method the sweep overrides to score token pairs")
    relies(isinstance(inspect.getattr_static(TemplateLM, "prefix_token_id"), property), "TemplateLM.prefix_token_id",
           "a property the sweep overrides: the token an empty context is scored after")
    relies("self.backend" in inspect.getsource(TemplateLM._encode_pair), "TemplateLM._encode_pair",
           "it reading `self.backend` ('causal': context and continuation encoded together, then split)")


def test_both_model_types_are_registered():
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    relies(get_model("balcony") is adapter.BalconyLM, "lm_eval.api.registry.register_model",
           "`@register_model('balcony')` making BalconyLM the model type `balcony`")
    relies(get_model("balcony-sweep") is adapter.ExitSweepLM, "lm_eval.api.registry.register_model",
           "`@register_model('balcony-sweep')` making ExitSweepLM the model type `balcony-sweep`")
    relies("arg_dict" in parameters(LM.create_from_arg_obj), "LM.create_from_arg_obj(arg_dict, ...)",
           "simple_evaluate building `balcony-sweep` from model_args={'model': balcony_model}")


def test_hflm_takes_a_loaded_model_and_its_tokenizer():
    from lm_eval.models.huggingface import HFLM

    found = parameters(HFLM.__init__)
    for name in ("pretrained", "tokenizer", "backend", "batch_size"):
        relies(name in found, f"lm_eval.models.huggingface.HFLM.__init__({name}=...)",
               "BalconyLM handing HFLM the exit model object, the tokenizer, backend='causal' and model_args")


def test_the_command_line_is_lm_evals_own():
    from lm_eval.__main__ import cli_evaluate

    relies(all(p.default is not inspect.Parameter.empty for p in parameters(cli_evaluate).values()),
           "lm_eval.__main__.cli_evaluate()", "calling it with no arguments: it reads sys.argv (balcony-lm-eval)")


# ----------------------------------------------------------------------------- evaluate and its requests


def test_evaluate_takes_what_the_sweep_passes():
    from lm_eval.evaluator import evaluate

    source = inspect.getsource(evaluate)
    for name in ("samples", "bootstrap_iters", "log_samples"):
        relies(name in parameters(evaluate), f"lm_eval.evaluator.evaluate({name}=...)",
               "the seeded document sample, no bootstrap, no logged samples")
    relies('"tasks"' in source and '"groups"' in source, "lm_eval.evaluator.evaluate(task_dict)",
           "a task_dict of {'tasks': {name: Task}, 'groups': {}, 'group_map': {}}")
    relies("task.build_all_requests(" in source, "lm_eval.evaluator.evaluate",
           "it building each task's requests with `task.build_all_requests`, looked up on the task object each run")
    relies("task.instances" in source, "lm_eval.evaluator.evaluate", "it reading the requests from `task.instances`")


def test_requests_are_built_where_the_sweep_reuses_them():
    from lm_eval.api.instance import Instance
    from lm_eval.api.task import Task

    relies(all(p.kind is inspect.Parameter.KEYWORD_ONLY for n, p in parameters(Task.build_all_requests).items()
               if n != "self"), "lm_eval.api.task.Task.build_all_requests",
           "keyword arguments only (the reusing stand-in passes them through)")
    relies(isinstance(inspect.getattr_static(Task, "instances"), property), "lm_eval.api.task.Task.instances",
           "the built requests, kept on the task between runs")
    fields = {f.name: f for f in dataclasses.fields(Instance)}
    for name in ("resps", "filtered_resps"):
        relies(name in fields, f"lm_eval.api.instance.Instance.{name}",
               "a run's answers on the request, which the stand-in clears before the next variant's run")
    relies(hasattr(lm_eval.api.task, "tqdm"), "lm_eval.api.task.tqdm",
           "the module-level tqdm that build_all_requests draws its bar with (silenced for the sweep)")
    relies("tqdm(" in inspect.getsource(Task.build_all_requests), "lm_eval.api.task.Task.build_all_requests",
           "it drawing its bar with the module's `tqdm`")


def test_lm_evals_loggers_sit_under_one_name():
    relies(lm_eval.api.task.eval_logger.name.startswith(adapter.LOGGER + "."), "lm_eval.api.task.eval_logger",
           f"lm-eval logging under `{adapter.LOGGER}`, whose level balcony lowers for the sweep")


def test_one_build_per_task_and_lm_evals_results_keys(tmp_path):
    """The sweep's runs: requests built once per task, every variant's results keyed `acc,none`."""
    rows = [{"question": f"Is {i} even", "choices": ["yes", "no"], "label": i % 2} for i in range(4)]
    (tmp_path / "two.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "two.yaml").write_text(
        f"task: two\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {tmp_path / 'two.jsonl'}\n"
        'test_split: test\noutput_type: multiple_choice\ndoc_to_text: "{{question}}?"\n'
        'doc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    tasks = adapter.build_tasks(["two"], include_path=str(tmp_path))
    relies(set(tasks) == {"two"}, "lm_eval.tasks.TaskManager.load(specs)['tasks']", "a {name: Task} dict")
    relies(adapter.document_count(tasks["two"]) == 4, "lm_eval.api.task.Task.eval_docs", "the evaluated documents")
    relies(adapter.chance_level(tasks["two"], [0, 1]) == 0.5, "Task.OUTPUT_TYPE / Task.doc_to_choice",
           "'multiple_choice' tasks naming each document's choices")
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2], tokenizer=tiny_tokenizer())
    lm = adapter.ExitSweepLM(model, progress=False)
    task, built = tasks["two"], []

    def counted(**kwargs):
        built.append(kwargs)
        type(task).build_all_requests(task, **kwargs)

    task.build_all_requests = counted  # the instance attribute evaluate calls, under the adapter's stand-in
    results = adapter.evaluate_variants(lm, tasks, {"two": [0, 1, 2]})
    relies(len(built) == 1, "lm_eval.api.task.Task.build_all_requests",
           f"one build for {len(results)} runs of `evaluate` (it built {len(built)} times)")
    relies(list(results) == lm.sweep.variants, "lm_eval.evaluator.evaluate", "one result per variant")
    for variant, found in results.items():
        relies("acc,none" in found["two"], "lm_eval.evaluator.evaluate(...)['results'][task]",
               f"metrics keyed '<metric>,<filter>' ('acc,none'); found {sorted(found['two'])}")
    relies(0 <= adapter.metric_value(results[Variant("full", None)], "two", "acc") <= 1,
           "lm_eval.evaluator.evaluate", "an accuracy over the sampled documents")
    relies(len(task.instances) == 3 * 2, "lm_eval.api.task.Task.instances", "one request per sampled document and choice")


# ----------------------------------------------------------------------------- the built-in tasks mirrored


def test_builtin_task_configs_are_found_and_loaded():
    from lm_eval.api.task import TaskConfig
    from lm_eval.tasks._yaml_loader import load_yaml

    root = Path(lm_eval.tasks.__file__).parent
    missing = [folder for folder in adapter.BUILTIN_FOLDERS if not (root / folder).is_dir()]
    relies(not missing, "lm_eval/tasks/", f"the built-in task folders {missing} (the offline tasks mirror them)")
    relies("resolve_func" in parameters(load_yaml), "lm_eval.tasks._yaml_loader.load_yaml(path, resolve_func=True)",
           "reading a built-in's YAML with its !function references resolved")
    config = adapter.mirror_builtin("arc_easy", "mirror", dict, {"source": "x"}, split="test", fewshot_split=None)
    relies(config.get("doc_to_text") and config.get("output_type") == "multiple_choice",
           "lm_eval.tasks._index.TaskIndex().build(paths)[name].yaml_path",
           "finding arc_easy's YAML in lm-eval's index of its task folders")
    fields = {f.name for f in dataclasses.fields(TaskConfig)}
    unknown = sorted(set(config) - fields)
    relies(not unknown, "lm_eval.api.task.TaskConfig", f"the config fields a mirror sets ({unknown} are gone)")


def test_task_manager_and_task_config_calls():
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

    for name in ("include_path", "include_defaults"):
        relies(name in parameters(TaskManager.__init__), f"lm_eval.tasks.TaskManager({name}=...)",
               "extra task folders, and lm-eval's own tasks indexed only when asked for")
    relies({"key", "value"} <= set(parameters(Task.set_config)), "lm_eval.api.task.Task.set_config(key, value)",
           "overriding num_fewshot (`balcony eval --num-fewshot`)")
    relies(logging.getLogger(adapter.LOGGER).name == "lm_eval", "logging", "the `lm_eval` logger")
