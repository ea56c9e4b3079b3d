"""`balcony eval`: per-exit quality with both baselines, from one trunk pass."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NUM_LAYERS, tiny_base, write_corpus

from balcony import BalconyModel
from balcony.cli import main
from balcony.evaluation.quality import evaluate, format_table


def rows(seed=0):
    return torch.randint(3, 96, (5, 16), generator=torch.Generator().manual_seed(seed))


def test_report_shape_and_identities():
    model = BalconyModel.from_base(tiny_base("gemma2"), exits=[2, NUM_LAYERS - 1])
    report = evaluate(model, rows(), batch_size=2, progress=False)
    assert report["tokens"] == 80 and report["sequences"] == 5
    last = report["exits"][1]
    assert last["exit"] == NUM_LAYERS - 1
    # a copied last layer at exit L-1 is the full model; so is truncation there
    assert last["balcony"]["kl"] == pytest.approx(0, abs=1e-5) and last["balcony"]["agreement"] == 1.0
    assert last["truncation"]["kl"] == pytest.approx(0, abs=1e-5)
    assert last["truncation"]["perplexity"] == pytest.approx(report["full"]["perplexity"], rel=1e-5)
    assert "early exit" in format_table(report) and "truncation" in format_table(report)


def test_early_exit_and_truncation_match_their_definitions():
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2], init="random")
    x = rows()
    report = evaluate(model, x, batch_size=5, progress=False)["exits"][0]
    out = model.base(x, output_hidden_states=True)
    full = out.logits.argmax(-1)
    norm, head = model.parts.norm, model.parts.head
    early = head(norm(out.hidden_states[2])).argmax(-1)      # hidden state after 2 layers
    trunc = head(norm(out.hidden_states[3])).argmax(-1)      # after 3 layers = exit 2 + one more base layer
    assert report["early_exit"]["agreement"] == pytest.approx((early == full).float().mean().item())
    assert report["truncation"]["agreement"] == pytest.approx((trunc == full).float().mean().item())


def test_cli_eval_writes_json(tiny_llama_dir, tmp_path, capsys):
    text = write_corpus(tmp_path / "held_out.txt", documents=10)
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(tiny_llama_dir), "--exits", "2,4", "--data", str(text), "--seq-len", "32",
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["full"]["perplexity"] > 1
    assert [r["exit"] for r in report["exits"]] == [2, 4]
    for row in report["exits"]:
        for family in ("balcony", "early_exit", "truncation"):
            assert set(row[family]) == {"kl", "agreement", "perplexity"}
    assert "truncation" in capsys.readouterr().out
