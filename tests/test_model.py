"""BalconyModel on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch
from conftest import NUM_LAYERS, VOCAB, tiny_base
from transformers import StoppingCriteria, StoppingCriteriaList

from balcony import BalconyModel, DepthRequest, ExitError
from balcony.core.balconies import new_balcony

EXITS = [2, 4]


def make(arch, init="copy", seed=0):
    return BalconyModel.from_base(tiny_base(arch, seed=seed), exits=EXITS, init=init)


def tokens(batch=2, length=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def test_full_depth_is_the_untouched_base(arch):
    model = make(arch)
    ids = tokens()
    reference = tiny_base(arch)  # a separate, identical copy that balcony never wrapped
    assert torch.equal(model(ids).logits, reference(ids).logits)
    assert torch.equal(model(ids, exit_layer=NUM_LAYERS).logits, reference(ids).logits)
    ours = model.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    theirs = reference.generate(ids[:, :5], max_new_tokens=8, do_sample=False)
    assert torch.equal(ours, theirs)


def test_base_is_frozen_and_balconies_train(arch):
    model = make(arch)
    assert not any(p.requires_grad for p in model.base.parameters())
    assert all(p.requires_grad for p in model.balconies.parameters())
    model.train()
    assert not model.base.training and model.balconies.training


@pytest.mark.parametrize("exit_layer", EXITS)
def test_cached_decoding_matches_uncached_forward(arch, exit_layer):
    model = make(arch)
    ids = tokens(length=14)
    full = model(ids, exit_layer=exit_layer).logits
    out = model(ids[:, :6], exit_layer=exit_layer, use_cache=True)
    cache, steps = out.cache, [out.logits]
    for t in range(6, ids.shape[1]):
        out = model(ids[:, t : t + 1], exit_layer=exit_layer, use_cache=True, cache=cache)
        cache = out.cache
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)


@pytest.mark.parametrize("exit_layer", EXITS)
def test_only_shallow_layers_run_at_an_exit(arch, exit_layer):
    model = make(arch)
    ran = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: ran.append(i)) for i, layer in enumerate(model.parts.layers)]
    balcony_ran = []
    handles.append(model.balconies[str(exit_layer)].layers[0].register_forward_hook(lambda *a: balcony_ran.append(1)))
    model.generate(tokens()[:, :4], exit_layer=exit_layer, max_new_tokens=3, do_sample=False)
    for h in handles:
        h.remove()
    assert ran and max(ran) < exit_layer
    assert set(ran) == set(range(exit_layer))
    assert len(balcony_ran) == 3  # prefill + two decode steps (the third token needs no forward)


def test_one_trunk_pass_gives_every_exit_and_the_teacher(arch):
    model = make(arch, init="random")
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    out = model.forward_exits(ids, attention_mask=mask, return_logits=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # padded rows count from their first real token
    for e in EXITS:
        alone = model(ids, attention_mask=mask, position_ids=positions, exit_layer=e).logits
        torch.testing.assert_close(out.logits[e], alone, atol=1e-5, rtol=0)
    full = model(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(out.teacher_logits, full, atol=1e-5, rtol=0)
    # without the teacher the trunk stops after the deepest exit
    ran = []
    handle = model.parts.layers[-1].register_forward_hook(lambda *a: ran.append(1))
    shallow = model.forward_exits(ids, attention_mask=mask, exits=[2], teacher=False, return_logits=True)
    handle.remove()
    assert not ran and shallow.teacher_hidden is None
    torch.testing.assert_close(shallow.logits[2], out.logits[2], atol=1e-5, rtol=0)


def test_balcony_gradients_flow_and_base_gets_none(arch):
    model = make(arch)
    out = model.forward_exits(tokens(), return_logits=True)
    loss = sum(l.float().logsumexp(-1).mean() for l in out.logits.values())
    loss.backward()
    assert all(p.grad is not None for p in model.balconies.parameters())
    assert all(p.grad is None for p in model.base.parameters())


def test_left_padded_batch_matches_each_prompt_alone(arch):
    model = make(arch)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, VOCAB, (n,), generator=g) for n in (7, 4, 5)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = p
        mask[row, width - len(p) :] = 1
    for exit_layer in [*EXITS, None]:
        batch = model.generate(ids, attention_mask=mask, exit_layer=exit_layer, max_new_tokens=6, do_sample=False, pad_token_id=0)
        for row, p in enumerate(prompts):
            alone = model.generate(p[None], exit_layer=exit_layer, max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert batch[row, width:].tolist() == alone[0, len(p) :].tolist(), (exit_layer, row)


def test_generation_options_work_at_an_exit():
    model = make("llama")
    ids = tokens(batch=1, length=4)

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= 7, dtype=torch.bool)

    out = model.generate(ids, exit_layer=2, max_new_tokens=20, do_sample=False,
                         stopping_criteria=StoppingCriteriaList([StopAfter()]))
    assert out.shape[1] == 7

    seen = []

    class Collect:
        def put(self, value):
            seen.append(value)

        def end(self):
            seen.append("end")

    model.generate(ids, exit_layer=4, max_new_tokens=3, do_sample=False, streamer=Collect())
    assert seen[-1] == "end" and len(seen) == 5  # prompt, three tokens, end

    torch.manual_seed(0)
    a = model.generate(ids, exit_layer=2, max_new_tokens=8, do_sample=True, temperature=1.5)
    torch.manual_seed(0)
    b = model.generate(ids, exit_layer=2, max_new_tokens=8, do_sample=True, temperature=1.5)
    assert torch.equal(a, b) and a.shape == (1, 12)


def test_exit_changes_call_to_call_without_reload():
    model = make("qwen2")
    ids = tokens()
    first = {e: model(ids, exit_layer=e).logits for e in [2, None, 4, 2]}
    assert torch.equal(model(ids, exit_layer=2).logits, first[2])
    assert not torch.equal(first[2], first[4])
    # the base is restored after every call
    assert len(model.parts.decoder.layers) == NUM_LAYERS
    assert model.base.config.num_hidden_layers == NUM_LAYERS


@pytest.mark.parametrize("arch_name", ["llama", "gemma2"])  # gemma2: layer types travel with the exit model
def test_an_exit_model_held_while_other_exits_run_keeps_its_own_exit(arch_name):
    model = make(arch_name, init="random")
    ids = tokens(batch=1)
    alone = {e: model(ids, exit_layer=e).logits for e in (2, 4, None)}
    greedy4 = model.generate(ids, exit_layer=4, max_new_tokens=5, do_sample=False, pad_token_id=0)
    outer = model.exit_model(2)
    torch.testing.assert_close(outer(ids).logits, alone[2])
    torch.testing.assert_close(model(ids, exit_layer=4).logits, alone[4])
    assert torch.equal(model.generate(ids, exit_layer=4, max_new_tokens=5, do_sample=False, pad_token_id=0), greedy4)
    torch.testing.assert_close(model(ids, exit_layer=None).logits, alone[None])
    every = model.forward_exits(ids, return_logits=True)
    torch.testing.assert_close(every.teacher_logits, alone[None])
    torch.testing.assert_close(every.logits[4], alone[4])
    torch.testing.assert_close(outer(ids).logits, alone[2])  # still exit 2, not the truncated stack
    assert len(model.parts.decoder.layers) == NUM_LAYERS


def test_bad_exits_give_clear_errors():
    model = make("llama")
    ids = tokens()
    with pytest.raises(ExitError, match="out of range"):
        model(ids, exit_layer=0)
    with pytest.raises(ExitError, match="out of range"):
        model(ids, exit_layer=NUM_LAYERS + 1)
    with pytest.raises(ExitError, match="has no balcony"):
        model.generate(ids, exit_layer=3, max_new_tokens=2)
    with pytest.raises(ExitError, match="not a layer number"):
        model(ids, exit_layer="fifteen")
    with pytest.raises(ExitError, match="exits must be in"):
        BalconyModel.from_base(tiny_base("llama"), exits=[NUM_LAYERS])
    check = model.policy.check_exit
    assert check("full") is None and check(NUM_LAYERS) is None and check("2") == 2


def test_inits_and_cost():
    copy_model = make("gemma2")
    last = copy_model.parts.layers[-1].state_dict()
    for e in EXITS:
        for k, v in copy_model.balconies[str(e)].layers[0].state_dict().items():
            assert torch.equal(v, last[k])
        assert torch.equal(copy_model.balconies[str(e)].norm.weight, copy_model.parts.norm.weight)
    random_model = make("gemma2", init="random")
    layer = random_model.balconies["2"].layers[0]
    assert not torch.equal(layer.mlp.down_proj.weight, copy_model.parts.layers[-1].mlp.down_proj.weight)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(0.02, rel=0.3)
    assert torch.all(random_model.balconies["2"].norm.weight == 0)  # Gemma norms scale by (1 + w): unit
    costs = [copy_model.costs.relative(e) for e in EXITS]
    assert 0 < costs[0] < costs[1] < 1 and copy_model.costs.relative(None) == 1.0


def test_budget_picks_the_deepest_exit_that_fits():
    model = make("llama")
    costs = {e: model.costs.relative(e) for e in EXITS}

    def pick(**request):
        return model.policy.resolve(DepthRequest(**request))

    assert pick(budget=1.0) is None
    assert pick(budget=costs[4]) == 4
    assert pick(budget=(costs[2] + costs[4]) / 2) == 2
    assert pick(budget=0.01) == 2  # nothing fits: the shallowest exit
    ids = tokens(batch=1, length=4)
    out = model.generate(ids, budget=costs[4], max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert out.exit_layer == 4 and out.mode is None and out.stats is None
    assert torch.equal(out.sequences, model.generate(ids, exit_layer=4, max_new_tokens=3, do_sample=False))
    with pytest.raises(ExitError, match="bench"):
        pick(max_ms_per_token=5)
    model.policy.profile = {"ms_per_token": {"2": 3.0, "4": 5.0, "full": 7.0}}
    assert pick(max_ms_per_token=6) == 4 and pick(max_ms_per_token=8) is None
    with pytest.raises(ExitError, match="not several"):
        model.generate(ids, exit_layer=2, budget=0.5)
    with pytest.raises(ExitError, match="budget must be"):
        pick(budget=0)


@pytest.mark.parametrize("arch_name", ["llama", "gemma2", "gpt2"])
def test_two_threads_generate_at_two_exits_at_once_and_each_gets_its_own_output(arch_name):
    import threading

    model = make(arch_name)
    ids = tokens(batch=1)
    options = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    alone = {e: model.generate(ids, exit_layer=e, **options) for e in (2, 4, None)}
    assert not torch.equal(alone[2], alone[4]) and not torch.equal(alone[4], alone[None])  # a mix-up would show
    results: dict = {}
    start = threading.Barrier(3)

    def worker(e):
        start.wait()
        results[e] = [model.generate(ids, exit_layer=e, **options) for _ in range(3)]

    threads = [threading.Thread(target=worker, args=(e,)) for e in (2, 4, None)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for e, outs in results.items():
        for out in outs:
            assert torch.equal(out, alone[e]), e


def test_exit_models_share_the_base_weights_and_never_change_the_base():
    model = make("llama")
    layers, config = list(model.parts.layers), model.base.config
    sub = model.exit_model(2)
    assert sub is model.exit_model(2) and model.exit_model(None) is model.base
    assert sub.model.layers[0] is model.parts.layers[0] and sub.model.layers[2] is model.balconies["2"].layers[0]
    assert sub.lm_head is model.base.lm_head and sub.model.embed_tokens is model.base.model.embed_tokens
    assert sub.config.num_hidden_layers == 3 and sub.config is not config
    assert list(model.parts.layers) == layers and model.base.config is config and config.num_hidden_layers == NUM_LAYERS
    assert sum(p.numel() for p in sub.parameters()) < sum(p.numel() for p in model.parameters())
    # a balcony replaced after its exit model was built is picked up
    model.balconies["2"] = new_balcony(model.base, model.parts, 2, model.balcony_config.sources(2), "random")
    assert model.exit_model(2).model.layers[2] is model.balconies["2"].layers[0]


def test_the_same_depth_request_is_refused_the_same_way_everywhere():
    from balcony import DepthRequest

    for bad, match in [(dict(exit=2, budget=0.5), "not several"), (dict(budget=1.5), r"\(0, 1\]"),
                       (dict(budget=0), r"\(0, 1\]"), (dict(budget=True), r"\(0, 1\]"),
                       (dict(max_ms_per_token=-1), "positive"), (dict(budget=float("nan")), r"\(0, 1\]")]:
        with pytest.raises(ExitError, match=match):
            DepthRequest(**bad)
    model = make("llama")
    with pytest.raises(ExitError, match="not several"):
        model.generate(tokens(), exit_layer=2, budget=0.5, max_new_tokens=2)
    resolve = model.policy.resolve
    with pytest.raises(ExitError, match=r"\(0, 1\]"):
        resolve(DepthRequest(budget=2.0))
    assert resolve(DepthRequest(budget=1.0)) is None and resolve(DepthRequest(budget=0.01)) == EXITS[0]
    assert resolve(DepthRequest("full")) is None and resolve(DepthRequest(4)) == 4


def test_an_exit_runs_while_another_thread_is_inside_a_generate_call():
    # With a lock around calls, the second thread could not start until the first returned,
    # and the first one's wait below would time out.
    import threading

    model = make("llama")
    ids = tokens(batch=1)
    other_done = threading.Event()
    seen: list[bool] = []

    class WaitForTheOtherThread(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if not seen:
                seen.append(other_done.wait(timeout=20))
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    def other():
        model.generate(ids, exit_layer=4, max_new_tokens=3, do_sample=False, pad_token_id=0)
        other_done.set()

    first = threading.Thread(target=lambda: model.generate(
        ids, exit_layer=2, max_new_tokens=3, do_sample=False, pad_token_id=0,
        stopping_criteria=StoppingCriteriaList([WaitForTheOtherThread()])))
    first.start()
    second = threading.Thread(target=other)
    second.start()
    first.join()
    second.join()
    assert seen == [True]
