"""The server's request surface is OpenAI's, field for field, and what it accepts it does: spoken to
with the official `openai` client and raw bodies, on a tiny random model."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from test_serve import KEY, Server, artifact, model, reference  # noqa: F401 - artifact, model: fixtures

from balcony.serving.api import ServeConfig
from balcony.serving.job import Job
from balcony.serving.sampler import pick

HEADERS = {"Authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "hi there"}]

COMPLETION_DEFAULTS = {
    "model": "balcony", "prompt": "hello", "best_of": 1, "echo": False, "frequency_penalty": 0, "logit_bias": {},
    "logprobs": None, "max_tokens": 4, "n": 1, "presence_penalty": 0, "seed": None, "stop": None, "stream": False,
    "stream_options": None, "suffix": None, "temperature": 1, "top_p": 1, "user": "someone",
}
CHAT_DEFAULTS = {
    "model": "balcony", "messages": MESSAGES, "frequency_penalty": 0, "logit_bias": None, "logprobs": False,
    "top_logprobs": None, "max_tokens": None, "max_completion_tokens": 4, "n": 1, "presence_penalty": 0,
    "response_format": {"type": "text"}, "seed": None, "stop": None, "stream": False, "stream_options": None,
    "temperature": 1, "top_p": 1, "tools": None, "tool_choice": "none", "parallel_tool_calls": True,
    "user": "someone", "metadata": {"k": "v"}, "store": False, "service_tier": "auto", "modalities": ["text"],
    "audio": None, "prediction": None, "reasoning_effort": None, "verbosity": "medium", "web_search_options": None,
    "prompt_cache_key": None, "safety_identifier": None, "functions": None, "function_call": None,
}
UNSUPPORTED_COMPLETION = [("best_of", 3), ("suffix", "after"), ("logprobs", 21), ("stop", ["a", "b", "c", "d", "e"]),
                          ("n", 0), ("temperature", 2.5), ("presence_penalty", 3), ("logit_bias", {"x": 1}),
                          ("logit_bias", {"999999": 1}), ("logit_bias", {"5": 101})]
UNSUPPORTED_CHAT = [("response_format", {"type": "json_object"}), ("store", True), ("service_tier", "flex"),
                    ("modalities", ["text", "audio"]), ("audio", {"voice": "alloy", "format": "wav"}),
                    ("prediction", {"type": "content", "content": "x"}), ("reasoning_effort", "high"),
                    ("top_logprobs", 3), ("top_logprobs", 21), ("web_search_options", {}),
                    ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
                    ("tool_choice", "required"), ("max_completion_tokens", 0)]
WRONG_TYPES = [("max_tokens", "5"), ("temperature", "1"), ("n", "2"), ("top_p", "0.5"), ("seed", "1"),
               ("stream", "true"), ("presence_penalty", "0"), ("max_tokens", 5.0), ("n", True), ("stream", 1),
               ("user", 5), ("stop", 5)]


@pytest.fixture(scope="module")
def server(model):  # noqa: F811 - the fixture imported above
    srv = Server(model, ServeConfig(api_key=KEY, max_tokens_limit=64, max_prompt_tokens=200, max_batch_size=8))
    yield srv
    srv.close()


def post(server, route, body):
    return httpx.post(server.url + route, json=body, headers=HEADERS, timeout=60)


def test_every_documented_field_at_its_default_is_accepted(server):
    assert post(server, "/v1/completions", COMPLETION_DEFAULTS).status_code == 200
    chat = post(server, "/v1/chat/completions", CHAT_DEFAULTS)
    assert chat.status_code == 200, chat.text
    # null is every optional field's default too
    nulls = {k: None for k in CHAT_DEFAULTS if k not in ("model", "messages")}
    assert post(server, "/v1/chat/completions", {"messages": MESSAGES, **nulls}).status_code == 200
    nulls = {k: None for k in COMPLETION_DEFAULTS if k not in ("prompt",)}
    assert post(server, "/v1/completions", {"prompt": "x", **nulls}).status_code == 200
    offered = {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "none"}
    assert post(server, "/v1/chat/completions", {**CHAT_DEFAULTS, **offered}).status_code == 200
    calls = post(server, "/v1/chat/completions", {**CHAT_DEFAULTS, **offered, "tool_choice": None})
    assert calls.status_code == 400 and calls.json()["error"]["param"] == "tool_choice"  # "auto": may call a tool


@pytest.mark.parametrize("route, defaults, field, value", [
    *[("/v1/completions", COMPLETION_DEFAULTS, f, v) for f, v in UNSUPPORTED_COMPLETION],
    *[("/v1/chat/completions", CHAT_DEFAULTS, f, v) for f, v in UNSUPPORTED_CHAT],
    *[("/v1/completions", COMPLETION_DEFAULTS, f, v) for f, v in WRONG_TYPES],
    *[("/v1/chat/completions", CHAT_DEFAULTS, f, v) for f, v in WRONG_TYPES],
])
def test_a_value_the_server_cannot_honour_is_a_400_naming_the_field(server, route, defaults, field, value):
    r = post(server, route, {**defaults, field: value})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


def test_stream_with_include_usage_ends_in_a_usage_chunk(server):
    client = server.client()
    chunks = list(client.chat.completions.create(model="balcony", messages=MESSAGES, max_tokens=5, stream=True,
                                                 stream_options={"include_usage": True}, temperature=0))
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 5
    assert all(c.usage is None for c in chunks[:-1])
    chunks = list(client.completions.create(model="balcony", prompt="abc", max_tokens=5, stream=True, n=2,
                                            stream_options={"include_usage": True}, temperature=0))
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens > 0
    assert {c.choices[0].index for c in chunks[:-1]} == {0, 1}


def test_continuous_usage_stats_count_the_tokens_streamed_so_far(server):
    # vLLM's extension, which load generators such as guidellm always send
    chunks = list(server.client().chat.completions.create(
        model="balcony", messages=MESSAGES, max_tokens=5, stream=True, temperature=0, extra_body={"ignore_eos": True},
        stream_options={"include_usage": True, "continuous_usage_stats": True}))
    counts = [c.usage.completion_tokens for c in chunks]
    assert all(c.usage is not None and c.usage.prompt_tokens > 0 for c in chunks)
    assert counts == sorted(counts) and counts[-1] == 5 and chunks[-1].choices == []


def test_n_choices(server, model):  # noqa: F811 - the fixture imported above
    client = server.client()
    got = client.completions.create(model="balcony", prompt="hello world", max_tokens=6, n=3, temperature=0,
                                    extra_body={"exit_layer": 2})
    assert [c.index for c in got.choices] == [0, 1, 2]
    assert {c.text for c in got.choices} == {reference(model, "hello world", 2, 6)}
    sampled = [client.chat.completions.create(model="balcony", messages=MESSAGES, max_tokens=8, n=3, seed=11)
               for _ in range(2)]
    assert [c.message.content for c in sampled[0].choices] == [c.message.content for c in sampled[1].choices]
    assert sampled[0].usage.completion_tokens <= 24


def test_a_list_of_prompts_gets_n_choices_each(server, model):  # noqa: F811 - the fixture imported above
    client = server.client()
    one = client.completions.create(model="balcony:2", prompt="tell me", max_tokens=0, echo=True, logprobs=1)
    got = client.completions.create(model="balcony:2", prompt=["hello world", "tell me"], max_tokens=4, n=2,
                                    temperature=0)
    assert [c.index for c in got.choices] == [0, 1, 2, 3]  # each prompt's n choices together, as OpenAI orders them
    assert [c.text for c in got.choices] == [reference(model, "hello world", 2, 4)] * 2 + [
        reference(model, "tell me", 2, 4)] * 2
    scored = client.completions.create(model="balcony:2", prompt=["hello world", "tell me"], max_tokens=0, echo=True,
                                       logprobs=1)  # how lm-eval's API models score a batch of requests
    assert [c.text for c in scored.choices] == ["hello world", "tell me"]
    assert scored.choices[1].logprobs.token_logprobs[1:] == pytest.approx(one.choices[0].logprobs.token_logprobs[1:],
                                                                          abs=1e-4)
    ids = client.completions.create(model="balcony:2", prompt=[[5, 6, 7], [8, 9]], max_tokens=0, echo=True, logprobs=1)
    assert [len(c.logprobs.tokens) for c in ids.choices] == [3, 2] and ids.usage.prompt_tokens == 5


def test_a_model_name_per_exit(server, model):  # noqa: F811 - the fixture imported above
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["balcony", "balcony:2", "balcony:4", "balcony:full"]
    for name, exit_layer in (("balcony:2", 2), ("balcony:4", 4), ("balcony:full", None)):
        got = client.completions.create(model=name, prompt="good day", max_tokens=8, temperature=0)
        assert got.choices[0].text == reference(model, "good day", exit_layer, 8)
        assert got.model_extra["exit_layer"] == ("full" if exit_layer is None else exit_layer)
    agreed = client.completions.create(model="balcony:2", prompt="x", max_tokens=2, extra_body={"exit_layer": 2})
    assert agreed.model_extra["exit_layer"] == 2
    with pytest.raises(openai.BadRequestError, match="exit_layer"):
        client.completions.create(model="balcony:2", prompt="x", max_tokens=2, extra_body={"exit_layer": 4})
    with pytest.raises(openai.NotFoundError, match="balcony:4"):
        client.completions.create(model="balcony:3", prompt="x", max_tokens=2)


def test_stop_strings_cut_the_text(server, model):  # noqa: F811 - the fixture imported above
    full = reference(model, "once upon", 4, 16)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip()
    got = server.client().completions.create(model="balcony:4", prompt="once upon", max_tokens=16, temperature=0,
                                             stop=[stop, "\x00never"])
    assert got.choices[0].text == full[: full.index(stop)] and got.choices[0].finish_reason == "stop"


def test_logit_bias_and_penalties_reach_the_sampler(server, model):  # noqa: F811 - the fixture imported above
    got = server.client().completions.create(model="balcony:2", prompt="x", max_tokens=5, temperature=0,
                                             logit_bias={"50": 100})
    assert got.choices[0].text == model.tokenizer.decode([50] * 5, skip_special_tokens=True)
    logits = torch.zeros(1, 8)
    logits[0, 3] = 1.0
    job = Job([1], 10, None, tokens=[3, 3, 5], frequency_penalty=0.4, presence_penalty=0.3)
    tokens, _ = pick(logits, [job], [None], eos=set())  # token 3: 1 - 2 * 0.4 - 0.3 < 0, token 5: -0.7
    assert tokens.tolist() == [0]
    hold = Job([1], 10, None, min_tokens=2)
    logits = torch.zeros(1, 8)
    logits[0, 7] = 5.0
    assert pick(logits, [hold], [None], eos={7})[0].tolist() == [0]  # no EOS before min_tokens
    repeat = Job([2], 10, None, repetition_penalty=2.0)
    logits = torch.tensor([[0.0, 0.0, 1.5, 1.0]])
    assert pick(logits, [repeat], [None], eos=set())[0].tolist() == [3]  # 1.5 / 2 < 1
    top1 = Job([2], 10, None, temperature=1.0, top_k=1)
    assert pick(torch.tensor([[0.0, 0.2, 0.1]]), [top1], [torch.Generator().manual_seed(0)], eos=set())[0].item() == 1


def _exit_logprobs(balcony, ids, exit_layer):
    with torch.no_grad():
        return balcony(input_ids=torch.tensor([ids]), exit_layer=exit_layer).logits[0].float().log_softmax(-1)


def test_logprobs_are_the_exits_log_softmax(server, model):  # noqa: F811 - the fixture imported above
    inputs = model.encode("hi there", chat=True)
    prompt = inputs["input_ids"][0].tolist()
    out = model.generate(**inputs, exit_layer=2, max_new_tokens=6, do_sample=False, pad_token_id=0)[0].tolist()
    got = server.client().chat.completions.create(model="balcony:2", messages=MESSAGES, max_tokens=6, temperature=0,
                                                  logprobs=True, top_logprobs=5)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens > 0
    reference_lp = _exit_logprobs(model, out, 2)
    for i, entry in enumerate(content):
        row = reference_lp[len(prompt) - 1 + i]
        assert abs(entry.logprob - row[out[len(prompt) + i]].item()) < 1e-4
        assert [round(t.logprob, 4) for t in entry.top_logprobs] == [round(v, 4) for v in row.topk(5).values.tolist()]
        assert len(entry.top_logprobs) == 5
    ids = [5, 17, 42, 8, 90]
    scored = server.client().completions.create(model="balcony:4", prompt=ids, max_tokens=0, echo=True, logprobs=2)
    lp = scored.choices[0].logprobs
    expected = _exit_logprobs(model, ids, 4)
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
    for i in range(1, len(ids)):
        assert abs(lp.token_logprobs[i] - expected[i - 1, ids[i]].item()) < 1e-4
    assert scored.choices[0].text == model.tokenizer.decode(ids, skip_special_tokens=True)
    assert scored.usage.completion_tokens == 0


def test_echo_with_generation_and_streamed_logprobs(server, model):  # noqa: F811 - the fixture imported above
    client = server.client()
    got = client.completions.create(model="balcony:2", prompt="tell me", max_tokens=4, temperature=0, echo=True,
                                    logprobs=1)
    choice = got.choices[0]
    assert choice.text == "tell me" + reference(model, "tell me", 2, 4)
    prompt_len = got.usage.prompt_tokens
    assert len(choice.logprobs.tokens) == prompt_len + got.usage.completion_tokens
    assert choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    pieces = list(client.completions.create(model="balcony:2", prompt="tell me", max_tokens=4, temperature=0,
                                            logprobs=1, stream=True))
    streamed = [lp for c in pieces if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(choice.logprobs.token_logprobs[prompt_len:], abs=1e-5)
