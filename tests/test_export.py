"""`balcony export`: an exit as a plain transformers checkpoint with the same logits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_base, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from balcony import BalconyModel, ExitError
from balcony.cli import main
from balcony.export import export


@pytest.mark.parametrize("exit_layer", [2, 5])
def test_exported_exit_loads_with_plain_transformers_and_matches(arch, exit_layer, tmp_path):
    model = BalconyModel.from_base(tiny_base(arch), exits=[2, 5], init="random", tokenizer=tiny_tokenizer())
    export(model, exit_layer, tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert plain.config.num_hidden_layers == exit_layer + 1
    ids = torch.randint(3, 96, (2, 14), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(plain(ids).logits, model(ids, exit_layer=exit_layer).logits, atol=1e-4, rtol=0)
    greedy = plain.generate(ids[:1, :5], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(greedy, model.generate(ids[:1, :5], exit_layer=exit_layer, max_new_tokens=6, do_sample=False,
                                              pad_token_id=0))
    assert AutoTokenizer.from_pretrained(tmp_path)("ab")["input_ids"]
    assert len(getattr(model.parts.decoder, model.parts.spec.layers)) == 6  # the base is untouched


def test_export_cli_and_errors(tiny_llama_dir, tmp_path, capsys):
    BalconyModel.from_base(str(tiny_llama_dir), exits=[3]).save_pretrained(tmp_path / "art")
    assert main(["export", str(tmp_path / "art"), "--exit", "3", "--out", str(tmp_path / "exit3")]) == 0
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "exit3").config.num_hidden_layers == 4
    assert main(["export", str(tmp_path / "art"), "--exit", "2", "--out", str(tmp_path / "x")]) == 2
    assert "has no balcony" in capsys.readouterr().err
    with pytest.raises(ExitError, match="needs no export"):
        export(BalconyModel.from_pretrained(tmp_path / "art"), "full", tmp_path / "y")
