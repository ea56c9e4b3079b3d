"""The `balcony` command line on a tiny local model (and `python -m balcony` in a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from balcony import BalconyModel
from balcony.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_json_for_fresh_balconies(capsys, tiny_llama_dir):
    code, out, _ = run(capsys, "info", "--model", str(tiny_llama_dir), "--exits", "2,4", "--json")
    assert code == 0
    report = json.loads(out)
    assert report["base"] == str(tiny_llama_dir) and report["num_layers"] == 6 and report["exits"] == [2, 4]
    costs = [row["relative_cost"] for row in report["per_exit"]]
    assert 0 < costs[0] < costs[1] < 1
    assert all(row["balcony_parameters"] > 0 for row in report["per_exit"])


def test_info_table_for_an_artifact(capsys, tiny_llama_dir, tmp_path):
    BalconyModel.from_base(str(tiny_llama_dir), exits=[3]).save_pretrained(tmp_path)
    code, out, _ = run(capsys, "info", str(tmp_path))
    assert code == 0 and "exit" in out and "cost vs full" in out and "trained, from" in out
    code, out, _ = run(capsys, "info", str(tmp_path), "--json")
    assert json.loads(out)["exits"] == [3]


def test_generate_json_at_an_exit_and_full(capsys, tiny_llama_dir):
    common = ["generate", "--model", str(tiny_llama_dir), "--exits", "2,4", "--prompt", "Hello", "--max-new-tokens", "5", "--json"]
    code, out, _ = run(capsys, *common, "--exit", "2")
    result = json.loads(out)
    assert code == 0 and result["exit"] == 2 and len(result["token_ids"]) <= 5 and result["tokens_per_second"] > 0
    assert isinstance(result["text"], str)
    code, out, _ = run(capsys, *common, "--exit", "full")
    full = json.loads(out)
    assert full["exit"] == "full"
    # the full model through the CLI is plain transformers greedy generate
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    tok = AutoTokenizer.from_pretrained(tiny_llama_dir)
    ids = tok("Hello", return_tensors="pt")
    ref = base.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert full["token_ids"] == ref[0, ids["input_ids"].shape[1] :].tolist()


def test_generate_streams_text_and_reports_speed(capsys, tiny_llama_dir):
    code, out, _ = run(capsys, "generate", "--model", str(tiny_llama_dir), "--exits", "3", "--exit", "3",
                       "--prompt", "Hi", "--chat", "--max-new-tokens", "4", "--temperature", "0.8", "--seed", "1")
    assert code == 0 and out.rstrip().endswith("tokens/s") and "exit 3" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--exit", "0"], "out of range"),
        (["--exit", "5"], "has no balcony"),
        (["--exit", "abc"], "not a layer number"),
        (["--max-new-tokens", "0"], "at least 1"),
    ],
)
def test_generate_bad_input_is_a_clear_error(capsys, tiny_llama_dir, argv, message):
    code, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--exits", "2", "--prompt", "x", *argv)
    assert code == 2 and message in err


def test_artifact_mismatch_is_a_clear_error(capsys, tiny_llama_dir, tmp_path):
    BalconyModel.from_base(str(tiny_llama_dir), exits=[3]).save_pretrained(tmp_path)
    (tmp_path / "balcony_model.safetensors").write_bytes(b"garbage")
    code, _, err = run(capsys, "info", str(tmp_path))
    assert code == 2 and "corrupt or truncated" in err


def test_python_dash_m_works(tiny_llama_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "balcony", "info", "--model", str(tiny_llama_dir), "--exits", "3", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["exits"] == [3]


def test_generate_with_a_budget_reports_the_exit(capsys, tiny_llama_dir):
    code, out, _ = run(capsys, "generate", "--model", str(tiny_llama_dir), "--exits", "2,4", "--prompt", "Hi",
                       "--budget", "0.6", "--max-new-tokens", "2", "--json")
    result = json.loads(out)
    assert code == 0 and result["exit"] == 2 and result["budget"] == 0.6 and result["relative_cost"] <= 0.6
    code, _, err = run(capsys, "generate", "--model", str(tiny_llama_dir), "--exits", "2", "--prompt", "Hi",
                       "--max-ms-per-token", "5")
    assert code == 2 and "balcony bench" in err


def test_generate_speculative_matches_the_full_model(capsys, tiny_llama_dir):
    common = ["generate", "--model", str(tiny_llama_dir), "--exits", "2,4", "--prompt", "Hello", "--max-new-tokens", "8",
              "--json"]
    code, out, _ = run(capsys, *common)
    full = json.loads(out)
    code, out, _ = run(capsys, *common, "--speculative", "--draft-exit", "4")
    spec = json.loads(out)
    assert code == 0 and spec["mode"] == "speculative" and spec["exit"] == "full"
    assert spec["token_ids"][: len(full["token_ids"])] == full["token_ids"]
    assert 0 <= spec["acceptance_rate"] <= 1
    code, _, err = run(capsys, *common, "--speculative")
    assert code == 2 and "--draft-exit" in err
    code, out, _ = run(capsys, *common, "--dynamic", "--threshold", "1.0")
    dynamic = json.loads(out)
    assert code == 0 and dynamic["mode"] == "dynamic" and dynamic["token_ids"][: len(full["token_ids"])] == full["token_ids"]
    assert set(dynamic["exits"]) == {6} and dynamic["compute_saved"] == 0
    code, out, _ = run(capsys, *common[:-1], "--dynamic", "--threshold", "0")
    assert code == 0 and "tokens left at depth 2: 100%" in out
    code, _, err = run(capsys, *common, "--dynamic")
    assert code == 2 and "--threshold" in err
    code, _, err = run(capsys, *common, "--dynamic", "--threshold", "0.5", "--speculative", "--draft-exit", "2")
    assert code == 2 and "choose one" in err
