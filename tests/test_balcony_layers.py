"""Balconies of more than one decoder layer: every path through the model runs all of them."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NUM_LAYERS, VOCAB, tiny_base
from safetensors.torch import load_file, save_file

from balcony import BalconyModel
from balcony.core.config import CONFIG_NAME, WEIGHTS_NAME, BalconyConfig
from balcony.core.exits import stack_model
from balcony.decoding.dynamic import DynamicDecoder
from balcony.core.errors import BalconyError
from balcony.decoding.speculative import speculative_generate
from balcony.training.grow import from_trained
from balcony.training.trainer import TrainConfig

EXITS = [2, 4]


def _model(arch, layers=2, init="random", double=False):
    base = tiny_base(arch)
    return BalconyModel.from_base(base.double() if double else base, exits=EXITS, init=init, balcony_layers=layers)


def _ids(batch=2, length=10, seed=3):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_every_layer_runs_in_the_exit_view_and_in_forward_exits(arch):
    model = _model(arch)
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    ran = []
    handles = [layer.register_forward_hook(lambda *a, i=i: ran.append(i))
               for i, layer in enumerate(model.balconies["2"].layers)]
    alone = model(ids, attention_mask=mask, position_ids=positions, exit_layer=2).logits
    assert ran == [0, 1]
    together = model.forward_exits(ids, attention_mask=mask, return_logits=True)
    for h in handles:
        h.remove()
    assert ran == [0, 1, 0, 1]
    torch.testing.assert_close(together.logits[2], alone, atol=1e-5, rtol=0)
    # cached decoding through both layers equals the uncached forward
    out = model(ids[:, :6], exit_layer=4, use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(6, ids.shape[1]):
        out = model(ids[:, t:t + 1], exit_layer=4, use_cache=True, cache=cache)
        cache, steps = out.cache, steps + [out.logits]
    torch.testing.assert_close(torch.cat(steps, 1), model(ids, exit_layer=4).logits, atol=1e-4, rtol=0)


def test_copy_init_continues_the_trunk_then_the_last_layer():
    model = _model("llama", layers=3, init="copy")
    assert model.balcony_config.sources(2) == [2, 3, NUM_LAYERS - 1]
    assert model.balcony_config.sources(4) == [4, NUM_LAYERS - 1, NUM_LAYERS - 1]  # clamped at the last layer
    ids = _ids()
    layers = list(model.parts.layers)
    same = stack_model(model.base, model.parts, layers[:2] + [layers[2], layers[3], layers[-1]], model.parts.norm)
    expected = same(ids, use_cache=False).logits
    torch.testing.assert_close(model(ids, exit_layer=2).logits, expected, atol=1e-5, rtol=0)
    assert model.costs.relative(2) > BalconyModel.from_base(tiny_base("llama"), exits=EXITS).costs.relative(2)


def test_next_init_is_the_trunk_continued_and_survives_a_round_trip(arch, tmp_path):
    """init "next": exit e's balcony starts as base layers e.. and the final norm, so the exit is
    the truncated base one layer deeper; the layers' kinds (sliding / global) follow them."""
    model = _model(arch, layers=1, init="next")
    assert model.balcony_config.sources(2) == [2] and _model(arch, layers=2, init="next").balcony_config.sources(4) == [4, 5]
    ids = _ids()
    layers = list(model.parts.layers)
    expected = stack_model(model.base, model.parts, layers[:3], model.parts.norm)(ids, use_cache=False).logits
    torch.testing.assert_close(model(ids, exit_layer=2).logits, expected, atol=1e-5, rtol=0)
    model.save_pretrained(tmp_path / "next")
    again = BalconyModel.from_pretrained(tmp_path / "next", base=tiny_base(arch))
    assert again.balcony_config.init == "next"
    out = again(ids[:, :6], exit_layer=2, use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(6, ids.shape[1]):
        out = again(ids[:, t:t + 1], exit_layer=2, use_cache=True, cache=cache)
        cache, steps = out.cache, steps + [out.logits]
    torch.testing.assert_close(torch.cat(steps, 1), expected, atol=1e-4, rtol=0)


def test_save_load_and_the_legacy_single_layer_format(tmp_path):
    model = _model("llama")
    model.save_pretrained(tmp_path / "two")
    again = BalconyModel.from_pretrained(tmp_path / "two", base=tiny_base("llama"))
    assert again.balcony_config.balcony_layers == 2
    ids = _ids()
    torch.testing.assert_close(again(ids, exit_layer=2).logits, model(ids, exit_layer=2).logits, atol=0, rtol=0)
    # artifacts written before multi-layer balconies name their one layer "E.layer.*"
    one = _model("llama", layers=1)
    one.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / WEIGHTS_NAME
    state = load_file(str(path))
    save_file({k.replace(".layers.0.", ".layer."): v for k, v in state.items()}, str(path))
    config = json.loads((tmp_path / "old" / CONFIG_NAME).read_text())
    del config["weights_sha256"]  # those artifacts recorded no checksum of their weights
    (tmp_path / "old" / CONFIG_NAME).write_text(json.dumps(config))
    old = BalconyModel.from_pretrained(tmp_path / "old", base=tiny_base("llama"))
    torch.testing.assert_close(old(ids, exit_layer=4).logits, one(ids, exit_layer=4).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "qwen2"])
def test_speculative_and_dynamic_stay_exact(arch):
    model = _model(arch, double=True)
    ids = _ids(batch=3, length=6)
    reference = model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    for e in EXITS:
        out, _ = speculative_generate(model, ids, torch.ones_like(ids), draft_exit=e, max_new_tokens=12, num_draft=3)
        assert torch.equal(out, reference), (arch, e)
    # dynamic exits with a threshold low enough that tokens leave early, then the deferred fill
    decoder = DynamicDecoder(model, 0.05)
    tokens = [decoder.prefill(ids[:1])]
    for _ in range(8):
        tokens.append(decoder.step(tokens[-1]))
    assert min(decoder.stats.exits) < NUM_LAYERS
    decoder.flush()


def test_training_grows_trained_balconies(tmp_path):
    one = _model("llama", layers=1)
    one.save_pretrained(tmp_path / "one")
    config = TrainConfig(out=str(tmp_path / "run"), model=None, init_from=str(tmp_path / "one"), balcony_layers=2)
    grown = from_trained(_with_base(config, tmp_path), None)
    for e in EXITS:
        new, old = grown.balconies[str(e)], one.balconies[str(e)]
        assert len(new.layers) == 2
        for k, v in old.layers[0].state_dict().items():  # the trained layer is now the last one
            assert torch.equal(new.layers[1].state_dict()[k], v)
        for k, v in grown.parts.layers[e].state_dict().items():  # the new one continues the trunk
            assert torch.equal(new.layers[0].state_dict()[k], v)
        assert torch.equal(new.norm.weight, old.norm.weight)
    _model("llama", layers=1, init="next").save_pretrained(tmp_path / "next")
    with pytest.raises(BalconyError, match="init 'next'"):
        from_trained(_with_base(TrainConfig(out="x", init_from=str(tmp_path / "next"), balcony_layers=2), tmp_path), None)
    with pytest.raises(BalconyError, match="drop trained layers"):
        grown.save_pretrained(tmp_path / "two")
        from_trained(TrainConfig(out="x", model=str(tmp_path / "base"), init_from=str(tmp_path / "two"), balcony_layers=1),
                   None)


def _with_base(config: TrainConfig, tmp_path) -> TrainConfig:
    # the tiny base as a local checkpoint, so init_from can load it by path
    base_dir = tmp_path / "base"
    if not base_dir.exists():
        tiny_base("llama").save_pretrained(base_dir)
    config.model = str(base_dir)
    return config


def test_layers_per_exit(tmp_path):
    model = _model("gemma2", layers={"2": 2})
    assert [len(model.balconies[str(e)].layers) for e in EXITS] == [2, 1]
    ids = _ids()
    together = model.forward_exits(ids, return_logits=True, baselines=True)
    for e in EXITS:
        torch.testing.assert_close(together.logits[e], model(ids, exit_layer=e).logits, atol=1e-5, rtol=0)
    flat = _model("gemma2", layers=1)
    assert model.costs.relative(2) > flat.costs.relative(2) and model.costs.relative(4) == flat.costs.relative(4)
    model.save_pretrained(tmp_path)
    again = BalconyModel.from_pretrained(tmp_path, base=tiny_base("gemma2"))
    assert again.balcony_config.balcony_layers == {"2": 2} and again.balcony_config.layers_at(4) == 1
    for bad in ({"3": 2}, {"2": 0}, 0):
        with pytest.raises(ValueError, match="balcony_layers"):
            _model("llama", layers=bad)
    with pytest.raises(ValueError, match="init must be one of"):  # the other field checks still run
        BalconyConfig(exits=EXITS, init="bogus", balcony_layers={"2": 2})
