"""Fuzzed: generated bodies (every field of both routes, wrong types, extreme numbers, unicode with
lone surrogates, deep nesting, huge arrays, broken JSON) never get a 5xx, every error is in
OpenAI's shape, and the server still answers a plain request afterwards with no slot left held."""

from __future__ import annotations

import json
import time

import httpx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_serve import KEY, Server, artifact, model  # noqa: F401 - artifact, model: fixtures

from balcony.serving.api import ServeConfig
from balcony.serving.protocol import ChatBody, CompletionBody

ROUTES = {"/v1/completions": CompletionBody, "/v1/chat/completions": ChatBody}
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
MAX_BODY = 300_000


class Raw:
    """JSON text put into a body as it is (nesting deeper than `json.dumps` writes, NaN, ...)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text[:60]!r}{'...' if len(self.text) > 60 else ''})"


def encode(value) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{encode(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(encode(v) for v in value) + "]"
    return json.dumps(value)  # NaN and Infinity as Python writes them, which the server's parser reads


text = st.text(st.characters(exclude_categories=()), max_size=12)  # surrogates included
numbers = st.one_of(st.integers(-3, 30), st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30)]),
                    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320, 1e308, 0.5]))
scalars = st.one_of(st.none(), st.booleans(), numbers, text)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(text, inner, max_size=4),
                        max_leaves=12)
huge = st.sampled_from([Raw("[" * 5000 + "]" * 5000), Raw("[" * 100 + "1" + "]" * 100), Raw('"' + "a" * 250_000 + '"'),
                        Raw("[" + ",".join(["7"] * 50_000) + "]"), Raw("[" + ",".join(['"x"'] * 20_000) + "]"),
                        Raw("NaN"), Raw("-Infinity"), Raw("1e999"), Raw("9" * 5000), Raw('"\\ud800"'),
                        Raw('"\\udfff\\ud800x"'), Raw('{"a":' * 300 + "1" + "}" * 300)])
small_tokens = st.integers(0, 4)
fraction = st.floats(-0.5, 2.5) | st.sampled_from([0, 1, 2, -2])
content = text | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", 5])},
                                                optional={"text": text | st.none()}), max_size=3) | st.none()
message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "robot"]),
                                 "content": content}, optional={"name": text, "tool_calls": anything})
PLAUSIBLE = {  # per field: values near what clients send, valid and not
    "model": st.sampled_from(["balcony", "balcony:2", "balcony:4", "balcony:full", "balcony:3", "gpt-4", "", "balcony:"]),
    "prompt": text | st.lists(st.integers(-2, 120), max_size=8) | st.lists(st.lists(st.integers(0, 90), max_size=4),
                                                                               max_size=2) | st.lists(text, max_size=2),
    "messages": st.lists(message, max_size=3),
    "max_tokens": small_tokens, "max_completion_tokens": small_tokens, "min_tokens": st.integers(0, 6),
    "n": st.integers(0, 3), "best_of": st.integers(0, 3), "logprobs": st.integers(-1, 22) | st.booleans(),
    "top_logprobs": st.integers(-1, 22), "echo": st.booleans(), "stream": st.booleans(), "ignore_eos": st.booleans(),
    "temperature": fraction, "top_p": fraction, "frequency_penalty": fraction, "presence_penalty": fraction,
    "repetition_penalty": fraction, "budget": fraction, "max_ms_per_token": fraction, "top_k": st.integers(-2, 200),
    "stop": text | st.lists(text, max_size=5) | st.just("s" * 100_000),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(), "other": st.booleans()}),
    "logit_bias": st.dictionaries(st.sampled_from(["5", "95", "96", "-1", "²", "٣", "9" * 30, "07", "x", " 5"]),
                                  fraction | st.floats(-200, 200), max_size=3),
    "seed": st.integers(-(2**64), 2**64), "exit_layer": st.sampled_from([2, 4, 6, 3, 0, -1, "full", "2", 2.0, True]),
    "suffix": text, "user": text,
    "response_format": st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "other"}, {}]),
    "tool_choice": st.sampled_from(["none", "auto", "required", {"type": "function"}]),
    "function_call": st.sampled_from(["none", "auto", {"name": "f"}]),
    "service_tier": st.sampled_from(["auto", "default", "flex", "turbo"]),
    "modalities": st.sampled_from([["text"], ["text", "audio"], []]),
    "reasoning_effort": st.sampled_from(["medium", "high", "none"]), "verbosity": st.sampled_from(["medium", "low"]),
    "metadata": st.dictionaries(text, text | st.integers(), max_size=3),
}


words = st.text(st.characters(codec="utf-8"), max_size=10)  # valid Unicode
VALID = {  # per field: values the route accepts (so that the request reaches the engine)
    "model": st.sampled_from(["balcony", "balcony:2", "balcony:4", "balcony:full"]),
    "prompt": words | st.lists(st.integers(3, 90), min_size=1, max_size=6),
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                                "content": words}), min_size=1, max_size=2),
    "max_tokens": st.integers(1, 4), "max_completion_tokens": st.integers(1, 4), "min_tokens": st.integers(0, 4),
    "n": st.integers(1, 3), "temperature": st.floats(0, 2), "top_p": st.floats(0, 1), "top_k": st.integers(-1, 100),
    "frequency_penalty": st.floats(-2, 2), "presence_penalty": st.floats(-2, 2), "repetition_penalty": st.floats(0.5, 2),
    "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": words | st.lists(words, max_size=4), "seed": st.integers(0, 2**32), "ignore_eos": st.booleans(),
    "logit_bias": st.dictionaries(st.sampled_from(["5", "17", "42"]), st.floats(-100, 100), max_size=2),
    "exit_layer": st.sampled_from([2, 4, "full"]), "echo": st.booleans(), "user": words,
    "response_format": st.just({"type": "text"}), "tool_choice": st.just("none"), "verbosity": st.just("medium"),
}


@st.composite
def bodies(draw, route: str):
    """Raw bytes for one request body: mostly a JSON object of the route's fields, most of them valid
    and a few wild (of the wrong type, extreme, near valid, huge)."""
    kind = draw(st.sampled_from(["object"] * 12 + ["broken", "not an object"]))
    if kind == "broken":
        return draw(st.binary(max_size=40) | st.sampled_from([b"", b"{", b'{"prompt": "x"', b"\xff\xfe{}", b"nul\x00"]))
    if kind == "not an object":
        return encode(draw(anything)).encode()
    schema = ROUTES[route]
    required = "prompt" if schema is CompletionBody else "messages"
    own = sorted(name for name in schema.model_fields if name != required)
    body = {required: draw(VALID[required]), "max_tokens": draw(VALID["max_tokens"])}
    if not draw(st.integers(0, 2)):
        body["stream"] = True
    for name in draw(st.lists(st.sampled_from(own), max_size=4, unique=True)):
        if name in VALID:
            body[name] = draw(VALID[name])
    names = sorted(set(CompletionBody.model_fields) | set(ChatBody.model_fields)) + ["frobnicate"]
    for name in draw(st.lists(st.sampled_from(names), max_size=2, unique=True)):  # the wild ones
        wild = st.sampled_from(["plausible"] * 6 + ["anything"] * 3 + ["huge"])
        value = {"plausible": PLAUSIBLE.get(name, anything), "anything": anything, "huge": huge}[draw(wild)]
        body[name] = draw(value | st.none())
    return encode(body).encode("utf-8", "surrogatepass")


def check_error(payload) -> None:
    error = payload["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)


def check(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text[:2000]
    if response.status_code >= 400:
        check_error(response.json())
    elif response.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events[-3:]
        for event in events[:-1]:
            chunk = json.loads(event)
            assert "error" not in chunk, chunk  # a generation that fails mid-stream is a server fault
    else:
        assert response.json()["choices"]


@pytest.fixture(scope="module")
def server(model):  # noqa: F811 - the fixture imported above
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from threads, and they stall on a busy machine
    srv = Server(model, ServeConfig(api_key=KEY, max_queue=8, max_batch_size=8, max_tokens_limit=16,
                                    max_prompt_tokens=200, max_body_bytes=MAX_BODY, batch_window_ms=0))
    with httpx.Client(base_url=srv.url, headers=HEADERS, timeout=60) as client:
        srv.http = client
        yield srv
    srv.close()
    torch.set_num_threads(threads)


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_generated_bodies_never_get_a_5xx_and_every_error_is_openai_shaped(server, route):
    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
    @given(bodies(route))
    def fuzz(raw):
        check(server.http.post(route, content=raw))

    fuzz()
    for method, path in (("GET", route), ("POST", route + "/x"), ("PUT", "/health")):  # no such route or method
        response = server.http.request(method, path, content=b"{}")
        assert response.status_code in (404, 405)
        check(response)
    plain = {"prompt": "hello"} if route == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    assert server.http.post(route, json={**plain, "max_tokens": 3}).status_code == 200
    deadline = time.time() + 30
    while server.app.state.engine.load or server.http.get("/health").json()["running"]:
        assert time.time() < deadline, "a fuzzed request still holds a slot"
        time.sleep(0.05)
    assert server.http.get("/health").json() == {"status": "ok", "load": 0, "queued": 0, "running": 0}
