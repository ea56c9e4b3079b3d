"""Self-speculative decoding (batch 1, greedy): the output is exactly the full model's."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, VOCAB, tiny_base

from balcony import BalconyModel, ExitError
from balcony.speculative import speculative_generate


@pytest.mark.parametrize("num_draft", [1, 3])
def test_greedy_output_is_the_full_models(arch, num_draft):
    model = BalconyModel.from_base(tiny_base(arch), exits=[2, 4])
    for seed in range(6):
        ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(seed))
        reference = model.generate(ids, max_new_tokens=18, do_sample=False, pad_token_id=0, eos_token_id=None)
        for exit_layer in (2, 4):
            out, stats = speculative_generate(model, ids, draft_exit=exit_layer, max_new_tokens=18, num_draft=num_draft)
            assert torch.equal(out, reference), (arch, seed, exit_layer)
            assert stats["rounds"] > 0 and 0 <= stats["acceptance_rate"] <= 1
    assert len(getattr(model.parts.decoder, model.parts.spec.layers)) == NUM_LAYERS  # the base is restored


def test_a_perfect_draft_is_always_accepted(arch):
    # a copied last layer at exit L-1 *is* the full model: every drafted token must be accepted
    model = BalconyModel.from_base(tiny_base(arch), exits=[NUM_LAYERS - 1])
    ids = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(9))
    reference = model.generate(ids, max_new_tokens=15, do_sample=False, pad_token_id=0, eos_token_id=None)
    out, stats = speculative_generate(model, ids, draft_exit=NUM_LAYERS - 1, max_new_tokens=15, num_draft=4)
    assert torch.equal(out, reference)
    assert stats["acceptance_rate"] == 1.0 and stats["accepted"] == 14  # 15 tokens: 1 from the prefill + 14 drafted


def test_bad_arguments():
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2])
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ExitError):
        speculative_generate(model, ids, draft_exit=None, max_new_tokens=4)
    with pytest.raises(ExitError, match="has no balcony"):
        speculative_generate(model, ids, draft_exit=3, max_new_tokens=4)
    with pytest.raises(NotImplementedError, match="batch size 1"):
        speculative_generate(model, ids.repeat(2, 1), draft_exit=2, max_new_tokens=4)


@pytest.mark.slow
def test_default_model_speculative_equals_full_greedy():
    model = BalconyModel.from_base(None, exits=[25])
    for prompt in ["The three primary colors are", "def fibonacci(n):", "Once upon a time, in a small village,"]:
        ids = model.tokenizer(prompt, return_tensors="pt")["input_ids"]
        reference = model.generate(ids, max_new_tokens=20, do_sample=False, eos_token_id=None,
                                   pad_token_id=model.tokenizer.pad_token_id)
        out, _ = speculative_generate(model, ids, draft_exit=25, max_new_tokens=20, num_draft=3)
        assert torch.equal(out, reference), prompt
