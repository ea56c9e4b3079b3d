"""End-to-end on the embedded default model (SmolLM2-135M-Instruct, converted once from GGUF)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from conftest import assert_cached_matches_uncached
from transformers import AutoModelForCausalLM

from balcony import BalconyModel
from balcony.cli import main
from balcony.core import kernels
from balcony.default import default_model_path

pytestmark = pytest.mark.slow
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def model():
    return BalconyModel.from_base(None)  # None: the default model, default exits


@pytest.fixture(scope="module")
def plain():
    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()


def test_default_model_shape_and_fast_reload(model):
    assert model.num_layers == 30 and model.exits == [15, 20, 25]
    assert model.base.config.model_type == "llama" and model.balcony_config.base_model == "default"
    start = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32)
    assert time.perf_counter() - start < 15  # the converted copy loads in about a second; generous for noisy CI


def test_full_depth_is_plain_transformers(model, plain):
    # packed CPU kernels (core.kernels) round differently from PyTorch's default path, nothing more;
    # with them off the full model is plain transformers bit for bit
    ids = model.tokenizer(PROMPT, return_tensors="pt")
    assert kernels.packed_count(model) > 0
    torch.testing.assert_close(model(**ids).logits, plain(**ids).logits, atol=1e-3, rtol=0)
    ours = model.generate(**ids, max_new_tokens=16, do_sample=False)
    theirs = plain.generate(**ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(ours, theirs)
    try:
        model.set_kernels("eager")
        assert kernels.packed_count(model) == 0
        assert torch.equal(model(**ids).logits, plain(**ids).logits)
        assert torch.equal(model.generate(**ids, max_new_tokens=16, do_sample=False), theirs)
    finally:
        model.set_kernels("packed")


def test_cached_decoding_matches_uncached_at_every_exit(model):
    ids = model.tokenizer(PROMPT + " red, yellow and blue.", return_tensors="pt")["input_ids"]
    assert_cached_matches_uncached(model, ids, atol=1e-4)


def test_every_way_through_an_exit_agrees_on_the_real_model(model):
    # the exit model, the all-exits trunk pass and the speculative spans run the same layers
    from balcony.decoding.speculative import speculative_generate

    ids = model.tokenizer(PROMPT + " red, yellow and blue.", return_tensors="pt")["input_ids"]
    every = model.forward_exits(ids, return_logits=True)
    torch.testing.assert_close(every.teacher_logits, model(ids).logits, atol=1e-4, rtol=0)
    for exit_layer in model.exits:
        torch.testing.assert_close(every.logits[exit_layer], model(ids, exit_layer=exit_layer).logits, atol=1e-4, rtol=0)
    full = model.generate(ids, max_new_tokens=12, do_sample=False)
    drafted, _ = speculative_generate(model, ids, draft_exit=15, max_new_tokens=12)
    assert torch.equal(drafted, full)


def test_no_deeper_layer_runs_at_exit_15(model):
    ran = set()
    handles = [l.register_forward_hook(lambda *a, i=i: ran.add(i)) for i, l in enumerate(model.parts.layers)]
    ids = model.tokenizer(PROMPT, return_tensors="pt")
    model.generate(**ids, exit_layer=15, max_new_tokens=4, do_sample=False)
    for h in handles:
        h.remove()
    assert ran == set(range(15))


def test_cli_generate_json_at_15_and_full_matches_transformers(capsys, plain):
    argv = ["generate", "--prompt", PROMPT, "--max-new-tokens", "32", "--json"]
    assert main([*argv, "--exit", "15"]) == 0
    at15 = json.loads(capsys.readouterr().out)
    assert at15["exit"] == 15 and 0 < len(at15["token_ids"]) <= 32 and at15["tokens_per_second"] > 0
    assert main([*argv, "--exit", "full"]) == 0
    full = json.loads(capsys.readouterr().out)
    assert full["exit"] == "full"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model_path())
    ids = tok(PROMPT, return_tensors="pt")
    ref = plain.generate(**ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
    assert full["token_ids"] == ref[0, ids["input_ids"].shape[1] :].tolist()


def test_shipped_balconies_load_by_name_and_beat_untrained_exits(capsys):
    """`default` is the trained artifact: it loads onto the embedded base (fingerprint checked)
    and, on a slice of the shipped held-out text, agrees with the full model far more often
    than the base's own head on the same layer (the plain early exit)."""
    from balcony.default import HELDOUT_TEXT
    from balcony.evaluation.quality import evaluate

    shipped = BalconyModel.from_pretrained("default")
    assert shipped.exits == [15, 20, 25] and shipped.balcony_config.base_model == "default"
    report = evaluate(shipped, str(HELDOUT_TEXT), max_tokens=1024)
    for row in report["exits"]:
        assert row["balcony"]["agreement"] > row["early_exit"]["agreement"] + 0.1
        assert row["balcony"]["kl"] < row["early_exit"]["kl"] / 2
    assert main(["info", "default", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trained"] is True


def test_rows_at_four_depths_in_one_served_batch_decode_as_generate_does_at_each():
    # the serving runner on the shipped balconies: one batch, rows at 15 / 20 / 25 / full,
    # chunked prefill, a newcomer joining mid-decode; each row's greedy tokens = generate alone
    from balcony.default import heldout_prompts
    from balcony.serving.runner import MixedRunner, Prefill

    shipped = BalconyModel.from_pretrained("default")
    tok = shipped.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in heldout_prompts(5)]
    exits = [15, 20, 25, None, 20]
    n = 8
    expected = []
    for prompt, exit_layer in zip(prompts, exits):
        out = shipped.generate(torch.tensor([prompt]), exit_layer=exit_layer, max_new_tokens=n, min_new_tokens=n,
                               do_sample=False, pad_token_id=0)
        expected.append(out[0, len(prompt):].tolist())
    runner = MixedRunner(shipped)
    filling = Prefill(runner, prompts[:4], exits[:4], pad=0, columns=16)
    while (logits := filling.advance()) is None:
        pass
    rows, got = filling.rows, [[] for _ in prompts]
    tokens = logits.argmax(-1)
    for step in range(n + 2):
        for r, t in zip([0, 1, 2, 3, 4][: len(rows)], tokens.tolist()):
            got[r].append(t)
        if step == 2:  # a fifth request joins while the others decode
            new, first = runner.prefill([prompts[4]], [exits[4]], pad=0)
            runner.join(rows, new)
            tokens = torch.cat([tokens, first.argmax(-1)])
            got[4].append(tokens[-1].item())
        tokens = runner.step(rows, tokens).argmax(-1)
    assert [g[:n] for g in got] == expected


def test_the_openai_client_at_exit_15_of_the_shipped_balconies():
    # through the official client, by model name alone: top_logprobs = the exit's own log-softmax,
    # a usage chunk closes an include_usage stream, n=3 gives three choices, echo scores the prompt
    import openai
    from test_serve import Server

    from balcony.serving.api import ServeConfig

    shipped = BalconyModel.from_pretrained("default")
    server = Server(shipped, ServeConfig(model_name="default", max_tokens_limit=32))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)
        assert {"default", "default:15", "default:full"} <= {m.id for m in client.models.list().data}
        messages = [{"role": "user", "content": PROMPT}]
        got = client.chat.completions.create(model="default:15", messages=messages, max_tokens=6, temperature=0,
                                             logprobs=True, top_logprobs=5)
        inputs = shipped.encode(PROMPT, chat=True)
        prompt = inputs["input_ids"][0].tolist()
        answer = shipped.generate(**inputs, exit_layer=15, max_new_tokens=6, do_sample=False,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert len(got.choices[0].logprobs.content) == len(answer) == got.usage.completion_tokens
        with torch.no_grad():
            lp = shipped(input_ids=torch.tensor([prompt + answer]), exit_layer=15).logits[0].float().log_softmax(-1)
        for i, entry in enumerate(got.choices[0].logprobs.content):
            row = lp[len(prompt) - 1 + i]
            assert abs(entry.logprob - row[answer[i]].item()) < 1e-4
            assert len(entry.top_logprobs) == 5
            for top, value in zip(entry.top_logprobs, row.topk(5).values.tolist()):
                assert abs(top.logprob - value) < 1e-4
        chunks = list(client.chat.completions.create(model="default:15", messages=messages, max_tokens=4,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4
        three = client.completions.create(model="default:15", prompt=PROMPT, max_tokens=4, n=3, temperature=1.0,
                                          seed=0)
        assert sorted(c.index for c in three.choices) == [0, 1, 2]
        echo = client.completions.create(model="default:15", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
        scored = echo.choices[0].logprobs
        assert echo.choices[0].text == PROMPT and scored.token_logprobs[0] is None
        assert len(scored.token_logprobs) == echo.usage.prompt_tokens > 1
        assert all(v is not None and v <= 0 for v in scored.token_logprobs[1:])
    finally:
        server.close()
