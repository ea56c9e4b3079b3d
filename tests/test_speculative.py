"""Self-speculative decoding: greedy output is the full model's exactly, sampling is in its distribution."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, VOCAB, tiny_base

from balcony import BalconyModel, ExitError
from balcony.decoding.sampling import sampling_probs
from balcony.decoding.speculative import DraftPolicy, draft_vocabulary, speculative_generate


def _model(arch: str, exits=(2, 4), **kw) -> BalconyModel:
    # float64: batched verification sums in another order than one-token decoding, and at
    # float32 a near-tie between two tokens of a random tiny model could flip on that alone
    return BalconyModel.from_base(tiny_base(arch).double(), exits=list(exits), **kw)


def _left_padded(seed: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (batch,), generator=g).tolist()
    width = max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_output_is_the_full_models(arch, batch):
    model = _model(arch)
    for seed in range(4):
        ids, mask = _left_padded(seed, batch)
        reference = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                                   pad_token_id=0, eos_token_id=None)
        for exit_layer, options in [(2, dict(num_draft=3, adaptive=False)), (4, dict(num_draft=4)),
                                    (2, dict(num_draft=5, draft_vocab=40, draft_threshold=0.2))]:
            out, stats = speculative_generate(model, ids, mask, draft_exit=exit_layer, max_new_tokens=16, **options)
            assert torch.equal(out, reference), (arch, batch, seed, exit_layer, options)
            assert stats["rounds"] > 0 and 0 <= stats["acceptance_rate"] <= 1
    assert len(getattr(model.parts.decoder, model.parts.spec.layers)) == NUM_LAYERS  # the base is restored


def test_rows_stop_at_eos_and_are_padded_like_generate():
    model = _model("llama")
    ids, mask = _left_padded(3, 4)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    eos = int(reference[1, ids.shape[1] + 2])  # row 1 "ends" at its third token
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0,
                               eos_token_id=eos)
    out, _ = speculative_generate(model, ids, mask, draft_exit=4, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, reference)


def test_a_perfect_draft_is_always_accepted(arch):
    # a copied last layer at exit L-1 *is* the full model: every drafted token must be accepted
    model = _model(arch, exits=[NUM_LAYERS - 1])
    ids, mask = _left_padded(9, 3)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=15, do_sample=False, pad_token_id=0,
                               eos_token_id=None)
    out, stats = speculative_generate(model, ids, mask, draft_exit=NUM_LAYERS - 1, max_new_tokens=15, num_draft=4,
                                      adaptive=False)
    assert torch.equal(out, reference)
    assert stats["acceptance_rate"] == 1.0
    assert stats["rounds"] == 4  # 1 token from the prefill, then 14 in rounds of 4, 4, 4, 2


def _exact_marginals(model: BalconyModel, prompt: torch.Tensor, temperature: float, top_p: float):
    """P(first new token) and P(second new token) of the full model, by enumerating the first."""
    with torch.no_grad():
        p1 = sampling_probs(model.base(prompt).logits[0, -1], temperature, top_p)
        both = torch.cat([prompt.repeat(VOCAB, 1), torch.arange(VOCAB)[:, None]], 1)
        p2_given = sampling_probs(model.base(both).logits[:, -1], temperature, top_p)
    return p1, p1 @ p2_given


def _sampled_marginals(out: torch.Tensor, start: int):
    counts = [torch.bincount(out[:, start + i], minlength=VOCAB).double() for i in (0, 1)]
    return [c / c.sum() for c in counts]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.9)])
def test_sampled_output_follows_the_full_models_distribution(temperature, top_p):
    # Tiny vocabulary (96): the exact distribution of the first two new tokens is computable.
    # 6000 independent rows sampled through draft + acceptance rule must match it; the
    # draft alone (exit 2, a different distribution) must not, so the test can fail.
    model = _model("llama", exits=[2])
    prompt = torch.tensor([[5, 17, 33, 8]])
    p1, p2 = _exact_marginals(model, prompt, temperature, top_p)
    rows = 6000
    g = torch.Generator().manual_seed(0)
    out, stats = speculative_generate(model, prompt.repeat(rows, 1), draft_exit=2, max_new_tokens=2, num_draft=1,
                                      adaptive=False, do_sample=True, temperature=temperature, top_p=top_p,
                                      generator=g)
    assert 0.05 < stats["acceptance_rate"] < 0.95  # both branches of the rule were exercised
    e1, e2 = _sampled_marginals(out, prompt.shape[1])
    draft_out = model.exit_model(2).generate(prompt.repeat(rows, 1), max_new_tokens=2, do_sample=True,
                                             temperature=temperature, top_p=top_p, top_k=0, pad_token_id=0,
                                             eos_token_id=None)
    _, d2 = _sampled_marginals(draft_out, prompt.shape[1])

    def chi2(observed, expected):  # over bins expected to hold >= 5 samples, the rest pooled
        big = expected * rows >= 5
        obs = torch.cat([observed[big], observed[~big].sum()[None]]) * rows
        exp = torch.cat([expected[big], expected[~big].sum()[None]]) * rows
        keep = exp > 0
        return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1

    from scipy.stats import chi2 as chi2_dist

    for observed, expected in [(e1, p1), (e2, p2)]:
        stat, dof = chi2(observed, expected)
        assert chi2_dist.sf(stat, dof) > 1e-3, (stat, dof)
    stat, dof = chi2(d2, p2)
    assert chi2_dist.sf(stat, dof) < 1e-6, "the test cannot tell the draft's distribution from the full model's"


def test_sampling_is_reproducible_with_a_generator():
    model = _model("qwen3")
    ids, mask = _left_padded(1, 2)
    runs = [speculative_generate(model, ids, mask, draft_exit=2, max_new_tokens=10, do_sample=True,
                                 generator=torch.Generator().manual_seed(7))[0] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_draft_policy_drafts_more_when_drafts_are_accepted():
    policy = DraftPolicy(6, draft_cost=0.4, verify_cost=0.6)
    for _ in range(30):
        policy.update(accepted=6, rejections=0)
    long = policy.next_k()
    for _ in range(30):
        policy.update(accepted=0, rejections=1)
    assert long >= 5 and policy.next_k() == 1
    assert DraftPolicy(3, 0.4, 0.6, adaptive=False).next_k() == 3


def test_draft_vocabulary_keeps_special_tokens_and_size():
    model = _model("llama")
    vocab = draft_vocabulary(model, 20)
    assert vocab.tolist() == sorted(set(vocab.tolist())) and len(vocab) == 20
    assert len(draft_vocabulary(model, 10_000)) == VOCAB
    with pytest.raises(ValueError):
        draft_vocabulary(model, 0)


def test_bad_arguments():
    model = _model("llama", exits=[2])
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ExitError, match="draft must be a balcony"):
        speculative_generate(model, ids, draft_exit=None, max_new_tokens=4)
    with pytest.raises(ExitError, match="has no balcony"):
        speculative_generate(model, ids, draft_exit=3, max_new_tokens=4)
    with pytest.raises(ValueError, match="at least 1"):
        speculative_generate(model, ids, draft_exit=2, max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(model, ids, draft_exit=2, max_new_tokens=4, do_sample=True, temperature=0)


def test_generate_mode_speculative_through_the_model():
    model = _model("gemma2")
    ids, mask = _left_padded(5, 2)
    reference = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                         mode="speculative", draft_exit=4, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference)
    assert out.mode == "speculative" and out.stats["mode"] == "speculative" and out.exit_layer is None
    assert 0 <= out.stats["acceptance_rate"] <= 1
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                                      mode="speculative", draft_exit=4), reference)  # a tensor by default
    with pytest.raises(ExitError, match="draft_exit"):
        model.generate(ids, max_new_tokens=4, mode="speculative")
    with pytest.raises(ExitError, match="mode"):
        model.generate(ids, max_new_tokens=4, mode="turbo")


@pytest.mark.slow
def test_default_model_speculative_equals_full_greedy_batched():
    model = BalconyModel.from_pretrained("default")
    tok = model.tokenizer
    prompts = ["The three primary colors are", "def fibonacci(n):", "Once upon a time, in a small village,",
               "Explain why the sky is blue."]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    reference = model.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=None,
                               pad_token_id=tok.pad_token_id)
    for exit_layer in (15, 25):
        out, stats = speculative_generate(model, batch["input_ids"], batch["attention_mask"], draft_exit=exit_layer,
                                          max_new_tokens=24, draft_vocab=8192)
        assert torch.equal(out, reference), exit_layer
        assert stats["acceptance_rate"] > 0.1


def test_low_precision_greedy_warns_that_equality_is_up_to_rounding():
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2, 4]).to(torch.bfloat16)
    ids, mask = _left_padded(0, 1)
    with pytest.warns(UserWarning, match="up to that rounding"):
        out, _ = speculative_generate(model, ids, mask, draft_exit=2, max_new_tokens=4)
    assert out.shape == (1, ids.shape[1] + 4)


def test_draw_samples_each_row_from_its_own_weights_and_never_a_zero_one():
    from balcony.decoding.sampling import draw

    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0], [2.0, 0.0, 0.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros_like(weights)
    for _ in range(4000):
        picked = draw(weights, g)
        counts[torch.arange(2), picked] += 1
    assert counts[0, 0] == counts[0, 3] == counts[1, 1] == counts[1, 2] == 0
    assert abs(counts[0, 2] / 4000 - 0.75) < 0.03 and abs(counts[1, 0] / 4000 - 0.5) < 0.03
    one = draw(weights[0], torch.Generator().manual_seed(3))
    assert one.shape == () and one == draw(weights[0], torch.Generator().manual_seed(3))  # seeded: reproducible
    many = draw(weights, uniform=torch.rand(2, 4000, generator=g))  # given uniforms: one draw each, [rows, n]
    assert many.shape == (2, 4000) and set(many[0].tolist()) == {1, 2} and set(many[1].tolist()) == {0, 3}
    assert abs((many[0] == 2).float().mean() - 0.75) < 0.03


def test_generate_with_the_drawn_token_processor_samples_the_warped_distribution():
    from transformers import LogitsProcessorList

    from balcony.decoding.sampling import DrawnToken, sampling_probs

    base = tiny_base("llama")
    prompt = torch.tensor([[5, 9, 13]])
    with torch.no_grad():
        probs = sampling_probs(base(prompt).logits[0, -1], 0.8, 0.9)
    torch.manual_seed(0)
    out = base.generate(prompt.repeat(3000, 1), do_sample=False, max_new_tokens=1, pad_token_id=0,
                        logits_processor=LogitsProcessorList([DrawnToken(0.8, 0.9)]))
    freq = torch.bincount(out[:, -1], minlength=probs.numel()).float() / 3000
    assert float(freq[probs == 0].sum()) == 0  # nothing outside the nucleus
    assert float((freq - probs).abs().max()) < 0.03
    with pytest.raises(ValueError, match="temperature > 0"):
        DrawnToken(0.0, 0.9)


def test_the_drawn_token_with_top_k_samples_what_generates_own_warpers_give():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from balcony.decoding.sampling import DrawnToken

    scores = torch.randn(2, 300, generator=torch.Generator().manual_seed(0)) * 2
    warped = TopPLogitsWarper(0.9)(None, TopKLogitsWarper(20)(None, TemperatureLogitsWarper(0.7)(None, scores.clone())))
    expected = warped.softmax(-1)
    sampler = DrawnToken(0.7, 0.9, top_k=20, generator=torch.Generator().manual_seed(1))
    counts = sum((sampler(None, scores) == 0).float() for _ in range(6000))
    assert torch.equal(counts > 0, expected > 0)  # the same tokens survive top-k and top-p
    assert float((counts / 6000 - expected).abs().max()) < 0.03
