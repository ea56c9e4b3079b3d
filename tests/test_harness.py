"""lm-evaluation-harness through the registered `balcony` model type, offline with a local task."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import tiny_base, tiny_tokenizer

pytest.importorskip("lm_eval")

from balcony import BalconyModel, ExitError  # noqa: E402
from balcony.evaluation.lm_eval_adapter import BalconyLM  # noqa: E402

ENV = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture()
def local_task(tmp_path):
    rows = [{"question": f"Is {i} even?", "choices": ["yes", "no"], "label": i % 2} for i in range(8)]
    (tmp_path / "tiny.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "tiny_choice.yaml").write_text(
        "task: tiny_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'tiny.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return tmp_path


def test_the_harness_sees_the_sub_model_at_the_exit():
    model = BalconyModel.from_base(tiny_base("qwen3"), exits=[2, 4], tokenizer=tiny_tokenizer())
    ids = torch.randint(3, 90, (2, 9), generator=torch.Generator().manual_seed(0))
    expected = model(ids, exit_layer=2).logits
    lm = BalconyLM(balcony_model=model, exit_layer=2, batch_size=2)
    torch.testing.assert_close(lm._model_call(ids), expected)
    # the evaluator holds an exit model, not the base: the model serves other exits meanwhile
    assert len(model.parts.decoder.layers) == 6
    torch.testing.assert_close(model(ids, exit_layer=4).logits, model.exit_model(4)(ids).logits)
    torch.testing.assert_close(lm._model_call(ids), expected)
    # model_args arrive as text; an exit and a budget together are refused, not resolved by precedence
    assert BalconyLM(balcony_model=model, budget="0.01", batch_size=2).exit_layer == 2
    with pytest.raises(ExitError, match="not several"):
        BalconyLM(balcony_model=model, exit_layer=4, budget="0.5", batch_size=2)


def test_lm_eval_command_line_with_the_registered_type(tiny_llama_dir, local_task, tmp_path):
    BalconyModel.from_base(str(tiny_llama_dir), exits=[3]).save_pretrained(tmp_path / "art")
    proc = subprocess.run(
        [sys.executable, "-m", "balcony.evaluation.harness", "--model", "balcony", "--model_args",
         f"artifact={tmp_path / 'art'},exit_layer=3", "--tasks", "tiny_choice", "--include_path", str(local_task),
         "--batch_size", "4"],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tiny_choice" in proc.stdout and "acc" in proc.stdout
