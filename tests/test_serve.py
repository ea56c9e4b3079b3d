"""`balcony serve`: a real server on a loopback port, spoken to with the official `openai` client."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import torch

from balcony import BalconyModel, DepthRequest, ExitError
from balcony.core.errors import BalconyError
from balcony.serving.api import BackgroundServer, ServeConfig, create_app
from balcony.serving.engine import Engine
from balcony.serving.scheduler import Scheduler

KEY = "sk-test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server(BackgroundServer):
    def __init__(self, model, config):
        self.app = create_app(model, config, calibrate=False)
        super().__init__(self.app)

    def client(self, key=KEY):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def artifact(tiny_llama_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("serve") / "art"
    torch.manual_seed(0)
    BalconyModel.from_base(str(tiny_llama_dir), exits=[2, 4], init="random").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model(artifact):
    return BalconyModel.from_pretrained(artifact)


@pytest.fixture(scope="module")
def server(model):
    srv = Server(model, ServeConfig(api_key=KEY, max_queue=40, max_tokens_limit=64,
                                    max_prompt_tokens=200, max_body_bytes=20_000, max_batch_size=8))
    yield srv
    srv.close()


def reference(model, prompt, exit_layer, n, chat=False):
    inputs = model.encode(prompt, chat=chat)
    out = model.generate(**inputs, exit_layer=exit_layer, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return model.tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_completion_and_chat_match_generate_at_each_exit(server, model):
    client = server.client()
    for exit_layer in (2, 4, None):
        extra = {} if exit_layer is None else {"exit_layer": exit_layer}
        got = client.completions.create(model="balcony", prompt="hello world", max_tokens=12, temperature=0,
                                        extra_body=extra)
        assert got.choices[0].text == reference(model, "hello world", exit_layer, 12)
        assert got.model_extra["exit_layer"] == ("full" if exit_layer is None else exit_layer)
        assert got.usage.completion_tokens <= 12 and got.usage.prompt_tokens > 0
        chat = client.chat.completions.create(model="balcony", messages=[{"role": "user", "content": "hi there"}],
                                              max_tokens=10, temperature=0, extra_body=extra)
        assert chat.choices[0].message.content == reference(model, "hi there", exit_layer, 10, chat=True)


def test_a_repeated_prompt_beginning_comes_from_the_prefix_cache_with_the_same_text(server, model):
    """The chat template's opening and a shared preamble are computed once (kept from the second
    request on), the usage says how many prompt tokens came from the cache, and the text is unchanged."""
    client = server.client()
    preamble = "You answer in one short sentence. Be kind and be precise about facts. "
    got = []
    for question in ("what is rain?", "why is snow white?", "where do birds sleep?"):
        messages = [{"role": "user", "content": preamble + question}]
        reply = client.chat.completions.create(model="balcony", messages=messages, max_tokens=8, temperature=0)
        got.append(reply.usage.prompt_tokens_details.cached_tokens)
        assert reply.choices[0].message.content == reference(model, preamble + question, None, 8, chat=True)
    assert got[0] == 0 and got[2] >= 16 and got[2] % 8 == 0, got


def test_greedy_output_equals_the_cli_generate_at_the_same_exit(server, artifact, capsys):
    from balcony.cli import main

    for exit_layer in ("2", "full"):
        capsys.readouterr()
        assert main(["generate", str(artifact), "--exit", exit_layer, "--prompt", "good morning", "--chat",
                     "--max-new-tokens", "12", "--json"]) == 0
        cli = json.loads(capsys.readouterr().out)
        got = server.client().chat.completions.create(
            model="balcony", messages=[{"role": "user", "content": "good morning"}], max_tokens=12, temperature=0,
            extra_body={"exit_layer": exit_layer if exit_layer == "full" else int(exit_layer)})
        assert got.choices[0].message.content == cli["text"] and got.model_extra["exit_layer"] == cli["exit"]


def test_streaming_gives_the_same_text(server, model):
    client = server.client()
    pieces = [c.choices[0].text for c in client.completions.create(
        prompt="stream me", max_tokens=12, temperature=0, stream=True, model="balcony", extra_body={"exit_layer": 4})]
    assert "".join(pieces) == reference(model, "stream me", 4, 12)
    chunks = list(client.chat.completions.create(model="balcony", messages=[{"role": "user", "content": "yo"}],
                                                 max_tokens=10, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == reference(model, "yo", None, 10, chat=True)


def test_budgets_pick_an_exit_and_sampling_is_seeded(server, model):
    client = server.client()
    got = client.completions.create(model="balcony", prompt="abc", max_tokens=4, extra_body={"budget": 0.5})
    assert got.model_extra["exit_layer"] == model.policy.resolve(DepthRequest(budget=0.5))
    a, b = (client.completions.create(model="balcony", prompt="abc", max_tokens=8, temperature=1.0, seed=7).choices[0].text
            for _ in range(2))
    assert a == b


def test_api_key_is_enforced_except_on_health(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").completions.create(model="balcony", prompt="x", max_tokens=2)
    assert httpx.get(server.url + "/v1/models").status_code == 401
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == ["balcony", "balcony:2", "balcony:4", "balcony:full"]


@pytest.mark.parametrize("body, status, words", [
    ("{not json", 400, "not valid JSON"),
    ('["a list"]', 400, "JSON object"),
    ('{"prompt": 5}', 400, "prompt"),
    ('{"prompt": "x", "max_tokens": "many"}', 400, "max_tokens"),
    ('{"prompt": "x", "exit_layer": 99}', 400, "exit"),
    ('{"prompt": "x", "exit_layer": 2, "budget": 0.5}', 400, "not several"),
    ('{"prompt": "x", "budget": 1.5}', 400, "budget"),
    ('{"prompt": "x", "model": "gpt-4"}', 404, "not served here"),
    ('{"prompt": "x", "max_tokens": 100000}', 400, "over the limit"),
    ('{"prompt": "' + "word " * 300 + '"}', 400, "tokens, over the limit"),
    ('{"prompt": "x", "frobnicate": 1}', 400, "frobnicate"),
    ('{"prompt": "x", "suffix": "after"}', 400, "suffix"),
    ('{"prompt": "' + "y" * 30_000 + '"}', 413, "over the limit"),
    ('{"prompt": "x", "exit_layer": true}', 400, "exit_layer"),
    ('{"prompt": "x", "seed": 18446744073709551615}', 400, "seed"),
    ('{"prompt": [1, 2, 100000]}', 400, "token ids"),
    ('{"prompt": [[1, 2], [3, 100000]]}', 400, "token ids"),
    ('{"prompt": []}', 400, "empty"),
    ('{"prompt": ["x", ""]}', 400, "empty"),
])
def test_bad_input_gets_a_clear_4xx(server, body, status, words):
    r = httpx.post(server.url + "/v1/completions", content=body, headers={"Authorization": f"Bearer {KEY}",
                                                                          "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]


def test_token_id_prompts_and_the_artifact_name(model, artifact):
    ids = model.tokenizer("Hello there", add_special_tokens=True)["input_ids"]
    srv = Server(model, ServeConfig(api_key=KEY, aliases=(str(artifact),)))
    try:
        client = srv.client()
        by_text = client.completions.create(model="balcony", prompt="Hello there", max_tokens=6, temperature=0,
                                            extra_body={"exit_layer": 2})
        by_ids = client.completions.create(model=str(artifact), prompt=ids, max_tokens=6, temperature=0,
                                           extra_body={"exit_layer": 2})
        nested = client.completions.create(model="balcony", prompt=[ids], max_tokens=6, temperature=0,
                                           extra_body={"exit_layer": 2})
    finally:
        srv.close()
    assert by_ids.choices[0].text == by_text.choices[0].text == nested.choices[0].text


def test_a_full_queue_answers_429(model):
    srv = Server(model, ServeConfig(max_queue=1, max_batch_size=1, batch_window_ms=200))
    try:
        results = []

        def call():
            results.append(httpx.post(srv.url + "/v1/completions", json={"prompt": "hello", "max_tokens": 40,
                                                                          "temperature": 0}, timeout=60).status_code)

        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 200 in results and 429 in results
    finally:
        srv.close()


def test_disconnect_mid_stream_frees_the_slot(model):
    srv = Server(model, ServeConfig(max_queue=1, max_batch_size=1, max_tokens_limit=4000,
                                    max_prompt_tokens=4000))
    try:
        with httpx.stream("POST", srv.url + "/v1/completions", json={"prompt": "go", "max_tokens": 3000, "stream": True,
                                                                      "temperature": 1.0}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")
        deadline = time.time() + 30
        while srv.app.state.engine.load:
            assert time.time() < deadline, "the cancelled stream still holds its slot"
            time.sleep(0.05)
        for _ in range(3):  # the queue of one admits new requests again
            ok = srv.client().completions.create(model="balcony", prompt="again", max_tokens=3, temperature=0)
            assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        srv.close()


def test_32_concurrent_streaming_clients_are_all_answered(server, model):
    expected = {p: reference(model, p, 4, 8) for p in ("alpha", "beta gamma", "delta")}
    results, errors = {}, []

    def call(i):
        prompt = list(expected)[i % 3]
        try:
            stream = server.client().completions.create(model="balcony", prompt=prompt, max_tokens=8, temperature=0,
                                                        stream=True, extra_body={"exit_layer": 4})
            results[i] = (prompt, "".join(c.choices[0].text for c in stream))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 32
    # Batched with other prompts (left padding), greedy text may only differ on exact float ties.
    assert sum(text == expected[prompt] for prompt, text in results.values()) >= 30
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert 'balcony_requests_by_exit_total{exit="4"}' in metrics and "balcony_generated_tokens_total" in metrics
    assert "balcony_quality_floor_conflicts 0.0" in metrics
    # the engine's steps are timed by kind, and every token after a request's first came from a decode row
    steps = {kind: float(re.search(rf'balcony_engine_step_seconds_count{{kind="{kind}"}} (\S+)', metrics)[1])
             for kind in ("decode", "prefill")}
    assert steps["prefill"] >= 1 and steps["decode"] >= 7
    tokens = float(re.search(r"(?m)^balcony_generated_tokens_total (\S+)", metrics)[1])
    assert 0 < float(re.search(r"(?m)^balcony_engine_decoded_rows_total (\S+)", metrics)[1]) < tokens


def test_load_adaptive_policy_sheds_depth_as_load_rises(model):
    scheduler = Scheduler(model, max_batch_size=4, target_ms_per_token=10.0)
    scheduler.full_step_ms = {1: 8.0, 4: 12.0}  # a machine where the full model takes 8 ms at batch 1
    assert scheduler.adaptive_exit(load=1) is None  # quiet: full depth
    chosen = [scheduler.adaptive_exit(load=n) for n in (1, 2, 4, 8, 16)]
    depth = [model.num_layers if e is None else e for e in chosen]
    assert depth == sorted(depth, reverse=True) and depth[-1] < depth[0]
    assert scheduler.adaptive_exit(load=1) is None  # and back to full when load falls
    assert Scheduler(model).adaptive_exit(load=100) is None  # no target: always the full model


def test_sigterm_drains_the_stream_in_flight_then_exits(artifact):
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "balcony", "serve", str(artifact), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.time() + 120
        while True:
            assert proc.poll() is None and time.time() < deadline, "server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        lines = []
        with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                          json={"prompt": "long", "max_tokens": 60, "stream": True, "temperature": 1.0, "seed": 1}) as r:
            for line in r.iter_lines():
                if not lines:
                    proc.send_signal(signal.SIGTERM)
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]"  # the request in flight was finished, not cut
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")
        # then exits: uvicorn re-raises the SIGTERM it caught once it has drained
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_quality_floor_bounds_the_adaptive_policy_and_counts_conflicts(model):
    scheduler = Scheduler(model, max_batch_size=4, target_ms_per_token=10.0, min_exit=4)
    scheduler.full_step_ms = {1: 8.0, 4: 12.0}
    assert scheduler.adaptive_exit(load=1) is None  # quiet: full depth, no conflict
    assert scheduler.floor_conflicts == 0
    shallowest = min(e for e in model.exits)
    unbounded = Scheduler(model, max_batch_size=4, target_ms_per_token=10.0)
    unbounded.full_step_ms = dict(scheduler.full_step_ms)
    assert unbounded.adaptive_exit(load=16) == shallowest < 4  # the target alone would go below the floor
    assert scheduler.adaptive_exit(load=16) == 4 and scheduler.floor_conflicts == 1  # the floor wins, and is counted
    never = Scheduler(model, max_batch_size=4, target_ms_per_token=10.0, min_exit="full")
    never.full_step_ms = dict(scheduler.full_step_ms)
    assert never.adaptive_exit(load=16) is None and never.floor_conflicts == 1
    with pytest.raises(ExitError, match="has no balcony"):
        Scheduler(model, min_exit=3)


def test_the_quality_floor_from_an_eval_report(model):
    report = {"exits": [{"exit": 2, "balcony": {"agreement": 0.4}}, {"exit": 4, "balcony": {"agreement": 0.7}}]}
    assert model.policy.quality_floor(report, 0.3) == 2
    assert model.policy.quality_floor(report, 0.5) == 4
    assert model.policy.quality_floor(report, 0.9) is None  # no exit is good enough: the full model
    with pytest.raises(ExitError, match="no per-exit figures"):
        model.policy.quality_floor({"tasks": []}, 0.5)


def test_a_request_arriving_mid_decode_is_admitted_within_a_step_at_its_own_exit(model):
    from balcony.serving.engine import Job

    engine = Engine(model, max_batch_size=4, batch_window_ms=0)
    engine.start(calibrate=False)
    try:
        events: list[tuple[str, str, object]] = []
        lock = threading.Lock()
        started = threading.Event()

        def recorder(name):
            def emit(kind, payload):
                with lock:
                    events.append((name, kind, payload))
                if name == "a" and kind == "delta":
                    started.set()
            return emit

        long_job = Job([5, 6, 7, 8], 60, 2, ignore_eos=True, emit=recorder("a"))
        engine.submit(long_job)
        assert started.wait(30)
        with lock:
            a_before = sum(1 for n, k, _ in events if n == "a" and k == "delta")
        late = Job([9, 10, 11], 5, 4, ignore_eos=True, emit=recorder("b"))
        engine.submit(late)
        deadline = time.time() + 30
        while not late.finished and time.time() < deadline:
            time.sleep(0.01)
        with lock:
            names = [(n, k) for n, k, _ in events]
        b_start = names.index(("b", "start"))
        a_between = sum(1 for n, k in names[:b_start] if n == "a" and k == "delta") - a_before
        assert a_between <= 2  # admitted at the next step, not after the long request's 60 tokens
        assert not long_job.finished and late.finished  # the short one finished while the long one ran
        expected = model.generate(torch.tensor([[9, 10, 11]]), exit_layer=4, max_new_tokens=5, min_new_tokens=5,
                                  do_sample=False, pad_token_id=0)[0, 3:].tolist()
        assert late.tokens == expected  # mixed into a batch at exit 2, it still decodes as exit 4 alone
    finally:
        long_job.cancel()
        engine.stop(drain=False, timeout=10)


def test_newcomers_join_a_decoding_batch_in_groups_when_asked(model):
    from balcony.serving.engine import Job

    scheduler = Scheduler(model, max_batch_size=8, waiting_served_ratio=1.5, max_waiting_steps=3)
    first, second, third = (Job([1, 2, 3], 4, None) for _ in range(3))
    scheduler.submit(first)
    assert scheduler.admit(8, decoding=0) == [first]  # nothing decoding: at once
    scheduler.submit(second)
    assert scheduler.admit(8, decoding=1) == [second]  # one waiting is int(1.5 x 1) per decoding row
    scheduler.submit(third)
    assert [scheduler.admit(8, decoding=2) for _ in range(3)] == [[], [], []]  # 1 < int(1.5 x 2): held
    assert scheduler.held_steps == 3
    assert scheduler.admit(8, decoding=2) == [third] and scheduler.held_steps == 0  # held 3 steps: joins
    group = [Job([1, 2, 3], 4, None) for _ in range(4)]
    for job in group:
        scheduler.submit(job)
    assert scheduler.admit(8, decoding=2) == group  # enough of them: at once
    late = Job([1, 2, 3], 4, None)
    scheduler.submit(late)
    assert scheduler.admit(8, decoding=6) == []
    late.cancel()
    assert scheduler.admit(8, decoding=6) == [] and scheduler.held_steps == 0  # nobody waits: the count restarts
    eager = Scheduler(model, waiting_served_ratio=1.5)  # max_waiting_steps 0, the default: every step
    eager.submit(late := Job([1, 2, 3], 4, None))
    assert eager.admit(8, decoding=5) == [late]
    with pytest.raises(BalconyError, match="max_waiting_steps"):
        Scheduler(model, max_waiting_steps=-1)
    with pytest.raises(BalconyError, match="max_waiting_ms"):
        Scheduler(model, max_waiting_ms=-5)


def test_a_held_newcomer_joins_once_it_has_waited_max_waiting_ms(model):
    from balcony.serving.engine import Job

    scheduler = Scheduler(model, max_batch_size=8, waiting_served_ratio=1.5, max_waiting_ms=10_000)
    scheduler.submit(job := Job([1, 2, 3], 4, None))
    assert [scheduler.admit(8, decoding=4) for _ in range(50)] == [[]] * 50  # no bound in steps: held
    job.submitted -= 10.0  # as if it had waited 10 s
    assert scheduler.admit(8, decoding=4) == [job]
    both = Scheduler(model, waiting_served_ratio=1.5, max_waiting_steps=2, max_waiting_ms=10_000)
    both.submit(other := Job([1, 2, 3], 4, None))
    assert [both.admit(8, decoding=4) for _ in range(3)] == [[], [], [other]]  # whichever bound comes first


def test_a_held_newcomer_joins_when_the_decoding_rows_finish(model):
    """The engine holds a newcomer while two rows decode (1 < int(1.5 x 2)), and it joins when they end,
    well within its bound of held steps; outputs stay the same."""
    from balcony.serving.engine import Job

    engine = Engine(model, max_batch_size=4, batch_window_ms=50, waiting_served_ratio=1.5, max_waiting_steps=1000)
    engine.start(calibrate=False)
    try:
        events: list[tuple[str, str]] = []
        lock = threading.Lock()
        started = threading.Event()

        def recorder(name):
            def emit(kind, payload):
                with lock:
                    events.append((name, kind))
                if kind == "delta":
                    started.set()
            return emit

        running = [Job([5, 6, 7, 8], 12, None, ignore_eos=True, emit=recorder(n)) for n in "ab"]
        for job in running:
            engine.submit(job)
        assert started.wait(30)
        late = Job([9, 10, 11], 5, None, ignore_eos=True, emit=recorder("c"))
        engine.submit(late)
        deadline = time.time() + 60
        while not late.finished and time.time() < deadline:
            time.sleep(0.01)
        with lock:
            names = list(events)
        assert names.index(("c", "start")) > max(names.index(("a", "done")), names.index(("b", "done")))
        expected = model.generate(torch.tensor([[9, 10, 11]]), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                  pad_token_id=0)[0, 3:].tolist()
        assert late.tokens == expected
    finally:
        engine.stop(drain=False, timeout=10)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_batch_keeps_decoding(model):
    from balcony.serving.engine import Job

    engine = Engine(model, max_batch_size=4, batch_window_ms=0, prefill_tokens=4)
    engine.start(calibrate=False)
    try:
        running = Job([5, 6, 7, 8], 200, None, ignore_eos=True)
        engine.submit(running)
        deadline = time.time() + 30
        while len(running.tokens) < 2 and time.time() < deadline:
            time.sleep(0.005)
        seen = {}

        def emit(kind, payload):
            if kind == "start":
                seen["at_start"] = len(running.tokens)

        prompt = [(3 * i) % 90 + 3 for i in range(20)]  # five chunks of 4 tokens
        long_prompt = Job(prompt, 4, 2, ignore_eos=True, emit=emit)
        submitted_at = len(running.tokens)
        engine.submit(long_prompt)
        while not long_prompt.finished and time.time() < deadline:
            time.sleep(0.005)
        assert long_prompt.finished
        # a decode step ran after each of the first four chunks before the prompt's first token
        assert seen["at_start"] - submitted_at >= 4
        expected = model.generate(torch.tensor([prompt]), exit_layer=2, max_new_tokens=4, min_new_tokens=4,
                                  do_sample=False, pad_token_id=0)[0, 20:].tolist()
        assert long_prompt.tokens == expected
    finally:
        running.cancel()
        engine.stop(drain=False, timeout=10)


def test_a_batch_that_fails_to_form_fails_its_requests_and_the_engine_serves_the_next(model):
    from balcony.serving.engine import Job

    engine = Engine(model, max_batch_size=4, batch_window_ms=0)
    add = engine.batch.add
    failures = iter([MemoryError("no room for the prompt")])

    def failing_add(jobs):
        err = next(failures, None)
        if err is not None:
            raise err
        add(jobs)

    engine.batch.add = failing_add
    engine.start(calibrate=False)
    try:
        events = {}
        first = Job([5, 6, 7], 4, None, ignore_eos=True, emit=lambda kind, payload: events.setdefault(kind, payload))
        engine.submit(first)
        deadline = time.time() + 30
        while not first.finished and time.time() < deadline:
            time.sleep(0.01)
        assert events["error"] == "generation failed: MemoryError: no room for the prompt"
        second = Job([5, 6, 7], 4, None, ignore_eos=True)
        engine.submit(second)
        while not second.finished and time.time() < deadline:
            time.sleep(0.01)
        while engine.scheduler.slots() != {"queued": 0, "running": 0} and time.time() < deadline:
            time.sleep(0.01)
        assert len(second.tokens) == 4 and engine.scheduler.slots() == {"queued": 0, "running": 0}
    finally:
        engine.stop(drain=False, timeout=10)


def test_a_lone_row_decodes_on_its_threads_and_a_batch_on_every_core(model):
    """A lone stream's decode step, bound by streaming the weights, keeps `threads` (a core left to HTTP);
    steps of several rows take `batch_threads`; the engine's thread keeps its own setting between."""
    from balcony.serving.engine import Job

    engine = Engine(model, max_batch_size=4, batch_window_ms=0, threads=1, batch_threads=3)
    runner, seen = engine.batch.runner, []
    step = runner.step

    def recording(rows, tokens):
        seen.append((len(rows), torch.get_num_threads()))
        return step(rows, tokens)

    assert engine.batch.prefill_threads == 3  # prompt chunks follow batch_threads

    runner.step = recording
    engine.start(calibrate=False)
    try:
        for group in ([Job([5, 6, 7], 4, None, ignore_eos=True)],
                      [Job([5 + i, 6, 7], 4, 2 if i else None, ignore_eos=True) for i in range(3)]):
            for job in group:
                engine.submit(job)
            deadline = time.time() + 30
            while not all(j.finished for j in group) and time.time() < deadline:
                time.sleep(0.01)
            assert all(j.finished for j in group)
    finally:
        engine.stop(drain=False, timeout=10)
    assert {threads for rows, threads in seen if rows == 1} == {1}
    assert {threads for rows, threads in seen if rows > 1} == {3}
    assert (Engine(model, threads=1).batch_threads, Engine(model, threads=5).batch_threads) == (
        max(1, torch.get_num_threads()), max(5, torch.get_num_threads()))


def test_building_an_engine_lets_go_of_the_builders_idle_openmp_team(model):
    """The server builds its engine on the thread that loaded the model and starts it from a worker
    thread: the builder's idle OpenMP team, left alive, makes every product of the engine's thread pay
    wake-ups (`core.kernels.release_idle_threads`)."""
    from balcony.core.kernels import release_idle_threads

    if torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task") or not release_idle_threads():
        pytest.skip("needs two torch threads, /proc and GNU OpenMP's pause")
    torch.randn(1 << 22).sum()  # work big enough to run in parallel: this thread now holds a team
    before = len(os.listdir("/proc/self/task"))
    Engine(model)
    assert len(os.listdir("/proc/self/task")) < before


def test_a_compiled_server_decodes_a_lone_stream_through_the_graph(model, traced_compile):
    """`serve --compile`: a lone full-depth request's steps go through the compiled decoder and the
    text still equals generate's; a request at an exit runs the spans."""
    from conftest import count_compiled_steps

    srv = Server(model, ServeConfig(api_key=KEY, compile=True))
    try:
        calls = count_compiled_steps(srv.app.state.engine.batch.runner)
        client = srv.client()
        got = client.completions.create(model="balcony", prompt="hello world", max_tokens=12, temperature=0)
        assert got.choices[0].text == reference(model, "hello world", None, 12)
        assert len(calls) >= 10  # every step after the first token (the prompt's pass gives that)
        calls.clear()
        got = client.completions.create(model="balcony", prompt="hello world", max_tokens=12, temperature=0,
                                        extra_body={"exit_layer": 2})
        assert got.choices[0].text == reference(model, "hello world", 2, 12) and not calls
    finally:
        srv.close()


def test_a_compiled_engine_compiles_the_lone_and_the_batch_graph_while_it_calibrates(model, monkeypatch):
    """The first step of a lone row and of a batch each compile a graph (minutes with inductor): the
    calibration at start runs both, so no request waits for a compile. Its largest batch (32) goes
    through the batch graph; where that is past GRAPH_ROWS and runs the spans, an extra 2-row run
    compiles the batch graph. (The compiled decoder is swapped for the plain one, which takes the
    same calls, so nothing compiles here.)"""
    from conftest import count_compiled_steps

    from balcony.core.exits import decoder_of
    from balcony.serving import runner as runner_module

    for graph_rows, graph_calls in ((32, {1, 32}), (16, {1, 2})):
        monkeypatch.setattr(runner_module, "GRAPH_ROWS", graph_rows)
        engine = Engine(model, max_batch_size=32, batch_window_ms=0, compile=True)
        engine.batch.runner.full = decoder_of(model.base, model.parts)
        calls = count_compiled_steps(engine.batch.runner)
        engine.start(calibrate=True)
        try:
            assert set(calls) == graph_calls, graph_rows
            assert set(engine.scheduler.full_step_ms) == {1, 32}  # a 2-row run warms up, it is not timed
        finally:
            engine.stop(drain=False, timeout=10)


def test_compiled_steps_need_a_base_whose_rows_can_join(tmp_path):
    from conftest import save_tiny_model

    model = BalconyModel.from_base(str(save_tiny_model("mistral", tmp_path)), exits=[2, 4], init="random")
    with pytest.raises(BalconyError, match="sliding-window layers.*without --compile"):
        Engine(model, compile=True)


def test_a_sliding_window_base_is_served_in_per_exit_batches_through_the_same_loop(tmp_path):
    from conftest import save_tiny_model

    from balcony.serving.batch import ExitBatch
    from balcony.serving.engine import Job

    model = BalconyModel.from_base(str(save_tiny_model("mistral", tmp_path)), exits=[2, 4], init="random")
    engine = Engine(model, max_batch_size=4, batch_window_ms=0)
    assert isinstance(engine.batch, ExitBatch)
    engine.start(calibrate=True)  # calibrates through the per-exit runner too
    try:
        prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]
        exits = [2, None, 2]
        jobs = [Job(p, 6, e, ignore_eos=True) for p, e in zip(prompts, exits)]
        for job in jobs:
            engine.submit(job)
        deadline = time.time() + 60
        while not all(j.finished for j in jobs) and time.time() < deadline:
            time.sleep(0.01)
        for prompt, exit_layer, job in zip(prompts, exits, jobs):
            expected = model.generate(torch.tensor([prompt]), exit_layer=exit_layer, max_new_tokens=6,
                                      min_new_tokens=6, do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
            assert job.tokens == expected, exit_layer
        assert engine.scheduler.full_step_ms[1] > 0 and engine.scheduler.slots() == {"queued": 0, "running": 0}
    finally:
        engine.stop(drain=False, timeout=10)
