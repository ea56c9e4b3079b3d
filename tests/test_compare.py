"""`balcony compare` end to end on a tiny model and a tiny local task: the table, JSON and plot; a
stopped run continues where it stopped; a finished one is read back, not run again; bad input."""

from __future__ import annotations

import json

import pytest
from conftest import write_corpus

pytest.importorskip("lm_eval")

from balcony.cli import main
from balcony.evaluation import compare as compare_module
from balcony.training.interrupt import TrainingInterrupted

QUESTIONS = ["Is it raining today", "Can a fish climb", "Do owls sleep at noon", "Is snow cold"]


@pytest.fixture()
def setup(tmp_path, tiny_llama_dir, monkeypatch):
    for key, value in {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
        monkeypatch.setenv(key, value)
    rows = [{"question": q, "choices": ["yes", "no"], "label": i % 2} for i, q in enumerate(QUESTIONS)]
    (tmp_path / "choice.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'choice.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "Q: {{question}}?\\nA:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    corpus = write_corpus(tmp_path / "train.txt", documents=30)
    heldout = write_corpus(tmp_path / "heldout.txt", documents=4, seed=7)
    return ["compare", "--model", str(tiny_llama_dir), "--exits", "2,4", "--data", str(corpus), "--heldout",
            str(heldout), "--tokens", "320", "--seq-len", "16", "--batch-size", "4", "--lr", "3e-3",
            "--layerskip-lr", "1e-3", "--kl-topk", "8", "--kl-samples", "16", "--eval-every", "1000",
            "--val-sequences", "4", "--checkpoint-every", "2", "--tasks", "tiny_choice", "--include-path",
            str(tmp_path), "--limit", "4", "--out", str(tmp_path / "cmp")]


def test_compare_trains_every_method_on_the_same_tokens_and_a_rerun_skips_finished_work(setup, tmp_path,
                                                                                          monkeypatch, capsys):
    out = tmp_path / "cmp"
    # stopped in the middle of layerskip's training (a signal would stop it the same way) ...
    original_tick = compare_module._Clock.tick
    monkeypatch.setattr(compare_module._Clock, "tick", lambda self, trainer: original_tick(self, trainer) or (
        trainer.config.method == "layerskip" and trainer.step == 3 and not trainer.config.checkpoints.resume))
    assert main(setup) == 130
    assert "run the same compare command again" in capsys.readouterr().err
    assert (out / "balcony" / "training.json").is_file() and not (out / "layerskip" / "training.json").exists()
    # ... the same command continues it from its checkpoint, and finishes the rest
    assert main(setup) == 0
    printed, err = capsys.readouterr()
    assert "layerskip: training (resumed)" in err and "balcony: trained already" in err
    report = json.loads((out / "compare.json").read_text())
    assert (out / "compare.png").stat().st_size > 1000
    rows = {(r["method"], r["exit"]): r for r in report["rows"]}
    assert set(rows) == {(m, e) for m in ("balcony", "layerskip", "pruned") for e in ("2", "4", "full")}
    assert {m["tokens"] for m in report["methods"].values()} == {320}  # one token stream: same data, steps, order
    trained = {m: info["trained_parameters"] for m, info in report["methods"].items()}
    assert trained["balcony"] == trained["pruned"] < trained["layerskip"]
    for method in ("balcony", "pruned"):  # their full model is the original, untouched
        assert rows[method, "full"]["kl"] == 0 and rows[method, "full"]["agreement"] == 1
        assert rows[method, "full"]["average"] == report["original"]["average"]
    assert rows["layerskip", "full"]["kl"] > 0  # layerskip's changed, and measured
    assert rows["layerskip", "2"]["cost"] < rows["balcony", "2"]["cost"]  # exit e: e layers against e + 1
    assert report["teacher"]["rows"] > 0 and all(0 <= r["average"] <= 1 for r in report["rows"])
    assert "layerskip" in printed and "kept" in printed and "full model" in printed

    # a third run does no work at all: every training and evaluation is read back
    def refuse(*args, **kwargs):
        raise AssertionError("finished work ran again")

    monkeypatch.setattr(compare_module.Trainer, "fit", refuse)
    monkeypatch.setattr(compare_module, "evaluate_downstream", refuse)
    monkeypatch.setattr(compare_module, "held_out", refuse)
    assert main(setup) == 0
    table = printed[printed.index("320 training tokens"):]  # (training's own lines come before it)
    assert capsys.readouterr().out == table


@pytest.mark.parametrize("change, message", [
    (["--methods", "balcony,distil"], "--methods takes some of"),
    (["--exits", "2,9"], "exits must be in 1..5"),
    (["--tokens", "0"], "--tokens must be a positive"),
])
def test_bad_input_is_a_clear_error_before_any_training(setup, change, message, capsys, monkeypatch):
    monkeypatch.setattr(compare_module.Trainer, "fit", lambda *a, **k: (_ for _ in ()).throw(TrainingInterrupted()))
    assert main([*setup, *change]) == 2  # the later flag wins
    assert message in capsys.readouterr().err


def test_empty_training_data_is_a_clear_error(setup, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    argv = list(setup)
    argv[argv.index("--data") + 1] = str(empty)
    assert main(argv) == 2
    assert "0 tokens" in capsys.readouterr().err
