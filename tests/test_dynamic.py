"""Token-level dynamic exits: exact at the strictest threshold, and deferred KV recomputation is exact."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, VOCAB, tiny_base
from transformers.cache_utils import DynamicCache

from balcony import BalconyModel, ExitError
from balcony.decoding.dynamic import DynamicDecoder, dynamic_generate


def _model(arch: str) -> BalconyModel:
    return BalconyModel.from_base(tiny_base(arch).double(), exits=[2, 3, 4])


def _prompt(seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(seed))


def test_strictest_threshold_is_the_full_model(arch):
    model = _model(arch)
    for seed in range(3):
        ids = _prompt(seed)
        reference = model.generate(ids, max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=None)
        out, stats = dynamic_generate(model, ids, threshold=1.0, max_new_tokens=14)
        assert torch.equal(out, reference), (arch, seed)
        assert set(stats["exits"]) == {NUM_LAYERS} and stats["compute_saved"] == 0


def _threshold_with_mixed_exits(model, ids) -> tuple[float, dict]:
    for threshold in (0.5, 0.3, 0.2, 0.1, 0.05):
        out, stats = dynamic_generate(model, ids, threshold=threshold, max_new_tokens=16)
        if len(set(stats["exits"])) >= 2 and min(stats["exits"]) < NUM_LAYERS:
            return threshold, stats
    pytest.fail("no threshold gave a mix of early and full-depth tokens")


def test_deferred_recomputation_gives_the_cache_of_running_every_layer(arch):
    model = _model(arch)
    ids = _prompt(11)
    threshold, _ = _threshold_with_mixed_exits(model, ids)
    decoder = DynamicDecoder(model, threshold)
    tokens = [decoder.prefill(ids)]
    for _ in range(15):
        tokens.append(decoder.step(tokens[-1]))
    exits = decoder.stats.exits
    assert min(exits) < NUM_LAYERS and decoder.stats.deferred > 0  # some layers really were skipped, then filled
    decoder.flush()
    # every fed token (prompt + all emitted but the last) through every layer, at once
    fed = torch.cat([ids, torch.tensor([tokens[:-1]])], 1)
    reference = DynamicCache(config=model.base.config)
    with torch.no_grad():
        model.base(fed, cache=reference, use_cache=True)
    for span, (start, cache) in enumerate(zip(decoder.starts, decoder.caches)):
        stop = NUM_LAYERS if decoder.stops[span] is None else decoder.stops[span]
        for slot, layer in enumerate(range(start, stop)):
            ours, theirs = cache.layers[slot], reference.layers[layer]
            # float64, but some bases (Gemma 2) normalise in float32: differences ~1e-7, where a wrong entry is O(1)
            n = theirs.keys.shape[-2]  # sliding-window layers keep only the window's tail
            assert n > 0 and (n == fed.shape[1] or getattr(theirs, "is_sliding", False)), (arch, layer)
            torch.testing.assert_close(ours.keys[..., -n:, :], theirs.keys, atol=1e-6, rtol=1e-4)
            torch.testing.assert_close(ours.values[..., -n:, :], theirs.values, atol=1e-6, rtol=1e-4)


def test_lower_thresholds_exit_earlier_and_save_more():
    model = _model("llama")
    ids = _prompt(4)
    saved = [dynamic_generate(model, ids, threshold=t, max_new_tokens=16)[1]["compute_saved"] for t in (1.0, 0.5, 0.0)]
    assert saved[0] == 0 < saved[2] and saved[0] <= saved[1] <= saved[2]
    _, stats = dynamic_generate(model, ids, threshold=0.0, max_new_tokens=16)
    assert set(stats["exits"]) == {2}  # every token leaves at the first balcony


def test_screening_with_a_reduced_head():
    model = _model("gemma2")
    ids = _prompt(6)
    plain_out, plain = dynamic_generate(model, ids, threshold=0.3, max_new_tokens=16)
    out, stats = dynamic_generate(model, ids, threshold=0.3, max_new_tokens=16, draft_vocab=torch.arange(VOCAB))
    assert torch.equal(out, plain_out) and stats["exits"] == plain["exits"]  # the whole vocabulary: same decisions
    reference = model.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    out, _ = dynamic_generate(model, ids, threshold=1.0, max_new_tokens=16, draft_vocab=10)
    assert torch.equal(out, reference)


def test_reduced_head_screening_only_skips_tokens_outside_the_reduced_vocabulary():
    """A third of the vocabulary as the screen: where it lets a token through, the decision is the
    full head's; where it stops one the full head would have let exit, the full head's top token is
    outside the reduced vocabulary (inside it, the subset's top probability can only be higher)."""
    model = _model("llama")
    subset = torch.arange(0, VOCAB, 3)
    screened, full = DynamicDecoder(model, 0.3, draft_vocab=subset), DynamicDecoder(model, 0.3)
    states = torch.randn(300, 1, model.base.config.hidden_size, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    # normalised states at growing scales: from flat distributions to confident ones
    states = model.parts.norm(states) * torch.linspace(0.5, 8.0, 300, dtype=torch.float64)[:, None, None]
    through = stopped = 0
    for h in states:
        cheap, exact = screened._confident(h), full._confident(h)
        if cheap is not None:
            assert exact is not None and torch.equal(cheap, exact)
            through += 1
        elif exact is not None:
            assert int(exact.argmax()) not in subset.tolist()
            stopped += 1
    assert through > 0 and stopped > 0  # the screen both passes tokens on and saves full-head checks


def test_generate_mode_dynamic_and_bad_input():
    model = _model("qwen2")
    ids = _prompt(2)
    reference = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    out = model.generate(ids, max_new_tokens=8, mode="dynamic", threshold=1.0, return_dict_in_generate=True)
    assert torch.equal(out.sequences, reference) and out.mode == "dynamic" and "exit_share" in out.stats
    with pytest.raises(ExitError, match="threshold="):
        model.generate(ids, max_new_tokens=4, mode="dynamic")
    with pytest.raises(ValueError, match="threshold"):
        dynamic_generate(model, ids, threshold=1.5, max_new_tokens=4)
    with pytest.raises(ValueError, match="batch of 1"):
        dynamic_generate(model, ids.repeat(2, 1), threshold=0.5, max_new_tokens=4)
    with pytest.raises(ExitError, match="drop do_sample"):
        model.generate(ids, max_new_tokens=4, mode="dynamic", threshold=0.5, do_sample=True)
