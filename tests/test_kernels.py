"""Packed CPU products (core.kernels): the same model to float rounding, never in autograd's way."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import VOCAB, tiny_base
from torch import nn
from torch.nn import functional as F

from balcony import BalconyModel
from balcony.core import kernels

pytestmark = pytest.mark.skipif(not kernels.available(torch.float32), reason="oneDNN is not in this torch build")


def _uses_packed(linear: nn.Linear) -> bool:
    return linear.__dict__.get(kernels._ATTRIBUTE) is not None


def test_every_exit_agrees_with_pytorchs_own_products(arch):
    base = tiny_base(arch)
    attention = base.config._attn_implementation
    model = BalconyModel.from_base(base, exits=[1, 2])
    assert base.config._attn_implementation == (kernels.GROUPED_SDPA if attention == "sdpa" else attention)
    assert model.kernels == "packed" and kernels.packed_count(model) == sum(
        isinstance(m, nn.Linear) for m in model.modules())
    ids = torch.randint(3, VOCAB, (2, 9))
    packed = {e: model(ids, exit_layer=e).logits for e in (1, 2, None)}
    assert _uses_packed(model.parts.head)
    model.set_kernels("eager")
    assert kernels.packed_count(model) == 0 and base.config._attn_implementation == attention
    for e, logits in packed.items():
        torch.testing.assert_close(logits, model(ids, exit_layer=e).logits, atol=1e-4, rtol=1e-4)


def test_training_goes_through_autograd_and_the_next_evaluation_sees_the_step():
    torch.manual_seed(0)
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2])
    ids = torch.randint(3, VOCAB, (2, 8))
    with torch.no_grad():
        before = model(ids, exit_layer=2).logits
    balcony_linear = model.balconies["2"].layers[0].mlp.down_proj
    assert _uses_packed(balcony_linear)  # evaluated in eval mode under no_grad: packed
    model.train()
    optimizer = torch.optim.SGD(model.balconies.parameters(), lr=0.5)
    loss = model.logits(model.forward_exits(ids, teacher=False).hidden[2]).logsumexp(-1).mean()
    loss.backward()  # gradients through the head and the balcony: PyTorch's products, not packed ones
    assert balcony_linear.weight.grad is not None and balcony_linear.weight.grad.abs().sum() > 0
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after = model(ids, exit_layer=2).logits
        model.set_kernels("eager")
        eager_after = model(ids, exit_layer=2).logits
    assert not torch.allclose(before, after, atol=1e-3)  # the packed copy followed the optimizer's step
    torch.testing.assert_close(after, eager_after, atol=1e-4, rtol=1e-4)


def test_a_trainable_weight_in_training_mode_is_never_packed():
    linear = nn.Linear(8, 4)
    kernels.pack(linear)
    x = torch.randn(3, 8)
    with torch.no_grad():
        linear(x)
    assert not _uses_packed(linear)  # training mode, trainable: the weight may change under us
    linear.eval()
    with torch.no_grad():
        torch.testing.assert_close(linear(x), x @ linear.weight.T + linear.bias, atol=1e-5, rtol=1e-5)
    assert _uses_packed(linear)
    with torch.no_grad():
        linear.load_state_dict({"weight": torch.ones(4, 8), "bias": torch.zeros(4)})  # in place: packed again
        torch.testing.assert_close(linear(x), x.sum(-1, keepdim=True).expand(3, 4), atol=1e-5, rtol=1e-5)
    y = linear(x.requires_grad_())  # a gradient wanted through the product: autograd's path
    y.sum().backward()
    assert x.grad is not None


def test_moves_casts_and_the_environment(monkeypatch):
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2])
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        model(ids)
    assert _uses_packed(model.parts.head)
    model.to(torch.float16)  # oneDNN packs float32 (and bfloat16 where the CPU has it), not float16
    assert kernels.packed_count(model) == 0
    with torch.no_grad():
        model(ids)
    model.to(torch.float32)
    assert kernels.packed_count(model) > 0 and not _uses_packed(model.parts.head)  # packed again on first use
    model.set_kernels("eager").to(torch.float32)
    assert kernels.packed_count(model) == 0  # a move keeps the choice
    with pytest.raises(ValueError, match="use one of packed, eager"):
        model.set_kernels("fast")
    monkeypatch.setenv("BALCONY_KERNELS", "eager")
    plain = BalconyModel.from_base(tiny_base("llama"), exits=[2])
    assert kernels.packed_count(plain) == 0 and plain.base.config._attn_implementation == "sdpa"


def test_compiled_decode_steps_read_grouped_keys_and_values_in_place():
    """In a graph torch.compile traces, a decode step's attention under `kernels.GROUPED_SDPA` reads each
    key/value head in place (sdpa's `enable_gqa`) where transformers' sdpa copies it once per query
    head, and gives the same logits (rows left-padded, a cache from the prompt's eager pass)."""
    model = BalconyModel.from_base(tiny_base("llama"), exits=[2])
    base, graphs = model.base, []
    assert base.config.num_attention_heads > base.config.num_key_value_heads  # grouped heads

    def recording(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        out = base(ids, attention_mask=mask[:, :7], use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        cache = copy.deepcopy(out.past_key_values)
        got = torch.compile(base, backend=recording)(token, attention_mask=mask, past_key_values=out.past_key_values,
                                                     use_cache=True).logits
        model.set_kernels("eager")
        want = base(token, attention_mask=mask, past_key_values=cache, use_cache=True).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    attention = [n for g in graphs for n in g.graph.nodes if n.target is F.scaled_dot_product_attention]
    assert len(attention) == base.config.num_hidden_layers and all(n.kwargs.get("enable_gqa") for n in attention)
