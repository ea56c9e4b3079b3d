"""The prefix cache: prompts that share a beginning start from its kept KV and give what they give
computed in full; a block is kept from its second prompt on, within the budget."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_base
from test_runner import _greedy

from balcony import BalconyModel
from balcony.core.errors import BalconyError
from balcony.serving.prefix import PrefixCache
from balcony.serving.runner import MixedRunner, Prefill

SHARED = [3 + (i * 7) % 50 for i in range(19)]  # a system prompt: two whole blocks of 8, and 3 tokens more
TAILS = [[60, 61, 62, 63, 64], [70], [80, 81, 82, 83, 84, 85, 86, 87, 88, 89, 90, 91], [5, 6, 7]]
EXITS = [2, None, 4, None]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
@pytest.mark.parametrize("columns", [None, 3])
def test_prompts_sharing_a_beginning_start_from_its_kept_kv_and_decode_as_in_full(arch, columns):
    torch.manual_seed(0)
    model = BalconyModel.from_base(tiny_base(arch), exits=[2, 4], init="random")
    plain, cached = MixedRunner(model), MixedRunner(model, prefix_cache_bytes=1 << 24)
    prompts = [SHARED + tail for tail in TAILS]
    _, whole = plain.prefill(prompts, EXITS, pad=0)
    expected = _greedy(plain, *plain.prefill(prompts, EXITS, pad=0), 6)
    starts = []
    for _ in range(3):  # kept from the second prompt per exit on: the rows at exits 2 and 4 are alone at theirs
        filling = Prefill(cached, prompts, EXITS, pad=0, columns=columns)
        while (logits := filling.advance()) is None:
            pass
        starts.append(filling.cached)
        torch.testing.assert_close(logits, whole, rtol=1e-4, atol=1e-4)
        assert _greedy(cached, filling.rows, logits, 6) == expected
    assert starts == [0, 0, 16]  # whole blocks of the shared beginning only, then every row from them
    with pytest.raises(BalconyError, match="at least 0"):
        MixedRunner(model, prefix_cache_bytes=-1)


def _kv(value: float, block: int = 8):
    return [(torch.full((2, block, 4), value), torch.full((2, block, 4), -value))]  # one layer, 2 heads


def test_a_block_is_kept_from_its_second_prompt_on_and_matched_as_a_whole_prefix():
    cache = PrefixCache(budget=1 << 20)
    prompt = list(range(20))
    cache.offer(prompt, None, 0, lambda n: _kv(n))
    assert len(cache) == 0 and cache.match(prompt, None) == []  # one prompt's own tokens: not kept
    cache.offer(prompt, None, 0, lambda n: _kv(n))
    assert len(cache) == 2  # two whole blocks of 8
    assert [kv[0][0][0, 0, 0].item() for kv in cache.match(prompt, None)] == [0, 1]
    assert len(cache.match(prompt[:16], None)) == 1  # a prompt of exactly two blocks feeds its last token
    assert cache.match(prompt, 2) == []  # another exit's KV is another
    other = [99] + prompt[1:]  # the second block after another first one: not a match
    assert cache.match(other, None) == []


def test_the_prefix_cache_stays_within_its_budget_dropping_the_least_recently_used():
    one = sum(k.nbytes + v.nbytes for k, v in _kv(0))
    cache = PrefixCache(budget=2 * one)
    a, b, c = [1] * 9, [2] * 9, [3] * 9
    for prompt in (a, a, b, b):
        cache.offer(prompt, None, 0, lambda n: _kv(0))
    assert cache.match(b, None) and cache.match(a, None)  # a used last
    cache.offer(c, None, 0, lambda n: _kv(0))
    cache.offer(c, None, 0, lambda n: _kv(0))
    assert cache.bytes <= 2 * one
    assert cache.match(a, None) and cache.match(c, None) and not cache.match(b, None)
