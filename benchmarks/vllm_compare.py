"""Balcony's server and vLLM's OpenAI server under the same load, in interleaved rounds.

Used by `serve_load.py --compare-vllm` (its docstring says how to install vLLM and the third-party
load generator). Each round starts `balcony serve` (the full model pinned by model name,
`balcony:full`), loads it at every concurrency level, greedy and sampled, stops it, then does the
same to vLLM's server on the base checkpoint, then times plain transformers `generate` in this
process while no server runs: balcony, vLLM, balcony, vLLM, ... Servers stay up across a round's
levels (model loading is never timed) and get a warm-up burst first.

The load: N closed-loop clients (each sends its next request when the last one ends) of streaming
chat requests for `--duration` seconds, `--max-tokens` output tokens each (`ignore_eos`), prompts of
about `--prompt-tokens` tokens: a held-out passage cut to length before a held-out question, every
request's different (so vLLM's prefix cache sees no repeated prompt); each scenario of a round
takes its own block of prompts, the same block on both servers. Token counts come from the
`usage` chunk (`stream_options.include_usage`); inter-token latency is per request,
(last token - first token) / (tokens - 1), as guidellm and aiperf report it.

For balcony it also reads the engine's counters from /metrics around each scenario and prints where
the time between tokens went: how many steps only decoded and how many also fed newcomers' prompt
chunks, each kind's mean ms, and the prompt tokens computed per such step. At `--logprobs-streams`
its greedy run with `logprobs` sits between two plain greedy runs, and their mean is its baseline.
"""

from __future__ import annotations

import json
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import httpx
import torch

from balcony.default import heldout_prompts, heldout_texts

BLOCK = 256  # prompts per scenario: more than any level here sends in --duration
MODES = ("greedy", "sampled")
LOGPROBS, AGAIN = "greedy+logprobs", "greedy again"  # balcony only, at --logprobs-streams: plain, logprobs, plain


def sized_prompts(tokenizer, count: int, tokens: int) -> list[str]:
    """`count` different prompts of about `tokens` tokens: a held-out passage (each from its own
    offset in the held-out chats) cut so that, with a held-out question after it, the prompt has
    `tokens` tokens; a question longer than that is cut instead."""
    texts = [re.sub(r"<\|im_start\|>\w+\n", "", t).replace("<|im_end|>", "\n") for t in heldout_texts()]
    stream = [i for ids in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in ids]
    questions = heldout_prompts(count)
    asked = tokenizer(questions, add_special_tokens=False)["input_ids"]
    stride = max(1, (len(stream) - tokens) // count)
    out = []
    for i, (question, ids) in enumerate(zip(questions, asked)):
        need = tokens - len(ids) - 1  # "\n\n" is a token
        if need <= 0:
            out.append(tokenizer.decode(ids[:tokens]))
            continue
        start = (i * stride) % (len(stream) - need)
        out.append(f"{tokenizer.decode(stream[start:start + need]).strip()}\n\n{question}")
    return out


def stream_request(client: httpx.Client, url: str, body: dict, deadline: float) -> dict:
    """One streamed chat request: when it was sent, when each piece of text came, its usage."""
    start = time.perf_counter()
    stamps, usage = [], None
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body,
                           timeout=max(1.0, deadline - start)) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                choices = chunk.get("choices") or []
                if choices and choices[0].get("delta", {}).get("content"):
                    stamps.append(time.perf_counter())
        ok, error = bool(stamps), None if stamps else "no text"
    except Exception as err:  # noqa: BLE001 - counted and printed
        ok, error = False, repr(err)
    return {"start": start, "end": time.perf_counter(), "stamps": stamps, "usage": usage, "ok": ok, "error": error}


def closed_loop(url: str, body_for, concurrency: int, duration: float, limit: float) -> tuple[list[dict], float]:
    """`concurrency` clients, each sending `body_for(k)` (k: 0, 1, ... over all clients) as soon as its
    last request ended, until `duration` seconds have passed (each sends one at least); in-flight
    requests finish, within `limit` seconds from the start. Returns the requests and the wall time."""
    results: list[dict] = []
    counter = iter(range(10**9))  # next() on it is atomic under the GIL
    conns = [httpx.Client() for _ in range(concurrency)]
    ready = threading.Barrier(concurrency + 1)
    clock = {}

    def client(conn: httpx.Client) -> None:
        ready.wait()
        while True:
            results.append(stream_request(conn, url, body_for(next(counter)), clock["deadline"]))
            if time.perf_counter() >= clock["stop"] or not results[-1]["ok"]:
                return

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    start = time.perf_counter()
    clock.update(stop=start + duration, deadline=start + limit)
    ready.wait()
    for t in threads:
        t.join(timeout=max(0.0, clock["deadline"] - time.perf_counter()) + 5)
    for s in conns:
        s.close()
    done = [r["end"] for r in results]
    return list(results), (max(done) if done else time.perf_counter()) - start


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def summarize(results: list[dict], wall: float, **labels) -> dict:
    ok = [r for r in results if r["ok"]]
    count = [(r["usage"] or {}).get("completion_tokens") or len(r["stamps"]) for r in ok]
    ttft = [(r["stamps"][0] - r["start"]) * 1000 for r in ok]
    itl = [(r["stamps"][-1] - r["stamps"][0]) * 1000 / (n - 1) for r, n in zip(ok, count) if n > 1]
    prompt = [r["usage"]["prompt_tokens"] for r in ok if r["usage"]]
    for r in results:
        if not r["ok"]:
            print(f"{labels}: a request failed: {r['error']}", file=sys.stderr)
    return {**labels, "requests": len(ok), "failed": len(results) - len(ok), "tokens": sum(count),
            "tok_s": sum(count) / wall if wall > 0 else 0.0, "ttft_p50": pct(ttft, 0.5), "ttft_p95": pct(ttft, 0.95),
            "itl_p50": pct(itl, 0.5), "itl_p95": pct(itl, 0.95),
            "prompt_tokens": statistics.mean(prompt) if prompt else float("nan")}


def body_maker(model_name: str, prompts: list[str], offset: int, max_tokens: int, temperature: float,
               logprobs: bool = False):
    """Request k of a scenario: its prompt from the scenario's block; ignore_eos, usage on. No `seed`:
    vLLM 0.32's CPU runner dies on a seeded request whose prefill is split over steps (`CPU Generator
    does not use offset`, in `_bookkeeping_sync`), as happens at 32 streams."""
    def body(k: int) -> dict:
        b = {"model": model_name, "messages": [{"role": "user", "content": prompts[(offset + k) % len(prompts)]}],
             "max_tokens": max_tokens, "temperature": temperature, "stream": True, "ignore_eos": True,
             "stream_options": {"include_usage": True}}
        if logprobs:
            b.update(logprobs=True, top_logprobs=5)
        return b
    return body


def warm_up(url: str, model_name: str, args) -> None:
    """One request, then a burst at the largest concurrency (short ones): first-call costs, every batch size."""
    prompts = args.pool[-64:]
    closed_loop(url, body_maker(model_name, prompts, 0, 8, 0.0), 1, 0.0, 120)
    closed_loop(url, body_maker(model_name, prompts, 1, 4, 0.0), max(args.levels), 0.0, 300)


def own_levels(server: str, round_: int, url: str, model_name: str, args) -> list[dict]:
    """Every level, greedy then sampled; for balcony at --logprobs-streams, greedy with logprobs and greedy
    again between them, so the logprobs run sits between two plain ones (a machine that slows or speeds
    up over the minute is read on both sides)."""
    rows, block = [], 0
    for streams in args.levels:
        runs = [("greedy", 0.0, False), ("sampled", args.temperature, False)]
        if server == "balcony" and streams == args.logprobs_streams:
            runs[1:1] = [(LOGPROBS, 0.0, True), (AGAIN, 0.0, False)]
        for mode, temperature, logprobs in runs:
            body = body_maker(model_name, args.pool, block * BLOCK, args.max_tokens, temperature, logprobs)
            block += 1
            before = engine_counts(url) if server == "balcony" else None
            results, wall = closed_loop(url, body, streams, args.duration, args.time_limit)
            rows.append(summarize(results, wall, tool="own", server=server, round=round_, streams=streams, mode=mode))
            if before is not None:
                rows[-1]["steps"] = step_breakdown(before, engine_counts(url))
            print(f"  {fmt_row(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def engine_counts(url: str) -> dict[str, float]:
    """balcony's engine counters from its /metrics: steps and their seconds by kind, prompt tokens
    read and those the prefix cache held."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=30).text
    wanted = {"balcony_engine_step_seconds_count", "balcony_engine_step_seconds_sum", "balcony_prompt_tokens_total",
              "balcony_prompt_tokens_cached_total"}
    return {f"{s.name}:{s.labels.get('kind', '')}": s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name in wanted}


def step_breakdown(before: dict, after: dict) -> dict:
    """What the engine's steps did over a scenario: decode-only steps and steps that also fed newcomers'
    prompt chunks, how many and their mean ms, and the prompt tokens computed per such step."""
    def delta(name: str, kind: str = "") -> float:
        return after.get(f"{name}:{kind}", 0.0) - before.get(f"{name}:{kind}", 0.0)

    out = {}
    for kind in ("decode", "prefill"):
        n = delta("balcony_engine_step_seconds_count", kind)
        out[f"{kind}_steps"] = int(n)
        out[f"{kind}_ms"] = delta("balcony_engine_step_seconds_sum", kind) * 1000 / n if n else float("nan")
    computed = delta("balcony_prompt_tokens_total") - delta("balcony_prompt_tokens_cached_total")
    out["prompt_tokens_per_prefill_step"] = computed / out["prefill_steps"] if out["prefill_steps"] else float("nan")
    return out


def start_balcony(args, port: int):
    from serve_load import start_server

    cmd = [sys.executable, "-m", "balcony", "serve", args.artifact, "--port", str(port), "--model-name", "balcony",
           "--max-batch-size", str(args.batch), "--max-queue", str(2 * max(max(args.levels), args.batch)),
           "--max-tokens-limit", str(max(64, args.max_tokens)), "--prefill-tokens", str(args.prefill_tokens),
           *shlex.split(args.balcony_args or "")]
    # --compile compiles its graphs before it answers /health: minutes, the first time on a machine
    return start_server(cmd, port, "balcony serve", timeout=1800, log=args.server_log)


def start_vllm(args, port: int):
    from serve_load import start_server

    cmd = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", args.base, "--port", str(port),
           "--served-model-name", "balcony", "--dtype", "float32", "--max-model-len", "2048",
           "--max-num-seqs", str(args.batch),
           # on CPU the share of RAM vLLM reserves for its KV cache (its default, 0.92, is refused
           # when anything else holds memory); a quarter is ample here
           "--gpu-memory-utilization", "0.25", *shlex.split(args.vllm_args or "")]
    return start_server(cmd, port, "vLLM's server", timeout=900, log=args.server_log)


def one_server(server: str, round_: int, args) -> list[dict]:
    """Start one server, warm it up, run the own load and the load generator's, stop it."""
    from serve_load import free_port, stop_server

    port = free_port()
    began = time.perf_counter()
    proc = (start_balcony if server == "balcony" else start_vllm)(args, port)
    name = "balcony:full" if server == "balcony" else "balcony"
    url = f"http://127.0.0.1:{port}"
    print(f"round {round_}: {server} up in {time.perf_counter() - began:.0f} s", file=sys.stderr, flush=True)
    rows = []
    try:
        warm_up(url, name, args)
        if not args.loadgen_only:
            rows += own_levels(server, round_, url, name, args)
        if args.loadgen:
            from loadgen import loadgen_levels

            rows += loadgen_levels(args, server, round_, url, name)
    finally:
        stop_server(proc)
    return rows


@torch.inference_mode()
def generate_ms_per_token(model, args, repeats: int = 3) -> float:
    """Plain transformers `generate` on the base (greedy, dynamic cache, batch 1, this process, no server
    running): milliseconds per decoded token, (time of N tokens - time of 1) / (N - 1), median of prompts."""
    base, tok = model.base, model.tokenizer
    n = args.max_tokens
    per_token = []
    for prompt in args.pool[-repeats - 1:]:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False).to(base.device)
        times = {}
        for new in (1, n):
            start = time.perf_counter()
            base.generate(**enc, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=tok.pad_token_id)
            times[new] = time.perf_counter() - start
        per_token.append((times[n] - times[1]) * 1000 / (n - 1))
    return statistics.median(per_token[1:])  # the first prompt warms up


def compare(model, args) -> dict:
    """All rounds; returns the rows and plain generate's ms/token per round."""
    from balcony.default import is_named, named_model_path

    base = model.balcony_config.base_model
    args.base = str(named_model_path(base)) if is_named(base) else base
    args.levels = [int(c) for c in args.concurrency.split(",")]
    args.server_log = args.server_log or tempfile.mkstemp(prefix="serve-compare-", suffix=".log")[1]
    print(f"servers' output: {args.server_log}", file=sys.stderr)
    args.pool = sized_prompts(model.tokenizer, BLOCK * (2 * len(args.levels) + 2) + 8, args.prompt_tokens)
    rows, generate = [], []
    for round_ in range(1, args.rounds + 1):
        for server in ("balcony", "vllm"):
            rows += one_server(server, round_, args)
        generate.append(generate_ms_per_token(model, args))
        print(f"round {round_}: plain generate {generate[-1]:.1f} ms/token", file=sys.stderr, flush=True)
    return {"rows": rows, "generate_ms_per_token": generate}


# ----------------------------------------------------------------- the report

HEADER = (f"{'tool':<8} {'server':<8} {'rnd':>3} {'streams':>7} {'mode':<16} {'req':>4} {'tok/s':>7} "
          f"{'TTFT p50':>9} {'p95':>7} {'ITL p50':>8} {'p95':>7} {'prompt':>6}")


def fmt_row(r: dict) -> str:
    return (f"{r['tool']:<8} {r['server']:<8} {r['round']!s:>3} {r['streams']:>7} {r['mode']:<16} "
            f"{r['requests']:>4} {r['tok_s']:>7.1f} {r['ttft_p50']:>9.0f} {r['ttft_p95']:>7.0f} {r['itl_p50']:>8.1f} "
            f"{r['itl_p95']:>7.1f} {r['prompt_tokens']:>6.0f}")


def averaged(rows: list[dict]) -> list[dict]:
    """Per (tool, server, streams, mode): every figure's mean over the rounds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["tool"], r["server"], r["streams"], r["mode"]), []).append(r)
    out = []
    for (tool, server, streams, mode), rs in groups.items():
        mean = {k: statistics.mean(r[k] for r in rs) for k in ("tok_s", "ttft_p50", "ttft_p95", "itl_p50",
                                                              "itl_p95", "prompt_tokens")}
        out.append({"tool": tool, "server": server, "round": "avg", "streams": streams, "mode": mode,
                    "requests": sum(r["requests"] for r in rs), **mean})
    return out


def ratios(rows: list[dict]) -> list[dict]:
    """balcony / vLLM per (tool, streams, mode), each round's ratio, averaged over the rounds."""
    index = {(r["tool"], r["server"], r["round"], r["streams"], r["mode"]): r for r in rows}
    out: dict[tuple, dict[str, list[float]]] = {}
    for (tool, server, round_, streams, mode), ours in index.items():
        theirs = index.get((tool, "vllm", round_, streams, mode))
        if server != "balcony" or theirs is None:
            continue
        acc = out.setdefault((tool, streams, mode), {"tok_s": [], "itl_p50": [], "ttft_p50": []})
        for k in acc:
            acc[k].append(ours[k] / theirs[k] if theirs[k] else float("nan"))
    return [{"tool": t, "streams": s, "mode": m, **{k: statistics.mean(v) for k, v in acc.items()}}
            for (t, s, m), acc in sorted(out.items())]


def target_lines(rows: list[dict], generate: list[float], args) -> list[tuple[str, str, bool]]:
    """The speed targets against vLLM, each with what was measured and whether it holds."""
    lines = []
    for r in ratios(rows):
        if r["tool"] != "own":
            continue
        where = f"{r['streams']} streams {r['mode']}"
        lines.append((f"throughput >= 1.0x vLLM, {where}", f"{r['tok_s']:.2f}x", r["tok_s"] >= 1.0))
        lines.append((f"ITL p50 <= vLLM's, {where}", f"{r['itl_p50']:.2f}x", r["itl_p50"] <= 1.0))
    mean = {(r["server"], r["streams"], r["mode"]): r for r in averaged(rows) if r["tool"] == "own"}
    for streams, before in ((8, 1500.0), (32, 1900.0)):  # TTFT p50 measured before the engine's rework ("now")
        if ("balcony", streams, "greedy") in mean:
            ttft = mean[("balcony", streams, "greedy")]["ttft_p50"]
            lines.append((f"TTFT p50 no worse than the earlier {before / 1000:.1f} s, {streams} streams",
                          f"{ttft / 1000:.2f} s", ttft <= before))
    single = mean.get(("balcony", 1, "greedy"))  # a run without a 1-stream level has no single stream
    if single and generate:
        plain = statistics.mean(generate)
        lines.append(("single greedy stream within 10% of plain generate",
                      f"{single['itl_p50']:.1f} vs {plain:.1f} ms/token ({single['itl_p50'] / plain:.2f}x)",
                      single["itl_p50"] <= 1.1 * plain))
    if costs := logprobs_costs(rows, args.logprobs_streams):
        cost = statistics.mean(costs)
        lines.append((f"logprobs (top 5) cost <= 10% of throughput, {args.logprobs_streams} streams",
                      f"{cost:+.1%} ({' / '.join(f'{c:+.1%}' for c in costs)} by round)", cost <= 0.10))
    return lines


def logprobs_costs(rows: list[dict], streams: int) -> list[float]:
    """Per round, the throughput logprobs cost: 1 - (with logprobs) / (the mean of the plain greedy runs
    before and after it; the one before alone where a run has no second plain one)."""
    index = {(r["round"], r["mode"]): r["tok_s"] for r in rows
             if r["tool"] == "own" and r["server"] == "balcony" and r["streams"] == streams}
    costs = []
    for round_ in sorted({rnd for rnd, _ in index}):
        on, plain = index.get((round_, LOGPROBS)), [index.get((round_, m)) for m in ("greedy", AGAIN)]
        plain = [t for t in plain if t]
        if on and plain:
            costs.append(1 - on / statistics.mean(plain))
    return costs


def report(result: dict, args) -> None:
    rows, generate = result["rows"], result["generate_ms_per_token"]
    print(f"\nFull model pinned, balcony vs vLLM's OpenAI server on the same base, interleaved rounds "
          f"(balcony, vLLM) x {args.rounds}; closed-loop streaming chat clients for {args.duration:.0f} s per "
          f"scenario, ~{args.prompt_tokens}-token prompts (+ chat template: 'prompt' column), {args.max_tokens} "
          f"output tokens (ignore_eos); sampled at temperature {args.temperature}. Times in ms.")
    for tool in dict.fromkeys(r["tool"] for r in rows):
        print(f"\n[{tool}]\n{HEADER}\n{'-' * len(HEADER)}")
        for r in sorted((r for r in rows if r["tool"] == tool), key=lambda r: (r["round"], r["server"] != "balcony")):
            print(fmt_row(r))
        print("-" * len(HEADER))
        for r in sorted((r for r in averaged(rows) if r["tool"] == tool), key=lambda r: (r["streams"], r["mode"])):
            print(fmt_row(r))
    print(f"\n{'tool':<8} {'streams':>7} {'mode':<8}  balcony/vLLM (mean of per-round ratios): "
          f"{'tok/s':>6} {'ITL p50':>8} {'TTFT p50':>9}")
    for r in ratios(rows):
        print(f"{r['tool']:<8} {r['streams']:>7} {r['mode']:<8}  {'':41} {r['tok_s']:>6.2f} {r['itl_p50']:>8.2f} "
              f"{r['ttft_p50']:>9.2f}")
    print_steps(rows)
    print(f"\nplain transformers generate, batch 1, greedy: {', '.join(f'{g:.1f}' for g in generate)} ms/token by round")
    print("\ntargets")
    for name, measured, ok in target_lines(rows, generate, args):
        print(f"  {'PASS' if ok else 'MISS'}  {name:<62} {measured}")


def print_steps(rows: list[dict]) -> None:
    """balcony's engine steps per scenario (its /metrics): where the time between tokens went."""
    stepped = [r for r in rows if r.get("steps")]
    if not stepped:
        return
    print("\nbalcony's engine steps per scenario (from its /metrics): decode-only steps, and steps that also fed "
          "newcomers' prompt chunks (a running row waits for both); ms are means")
    print(f"{'rnd':>3} {'streams':>7} {'mode':<16} {'decode-only':>11} {'ms':>7} {'w/ prompt':>9} {'ms':>7} "
          f"{'share':>6} {'prompt tok/step':>15}")
    for r in sorted(stepped, key=lambda r: (r["round"], r["streams"])):
        s = r["steps"]
        total = s["decode_steps"] + s["prefill_steps"]
        share = s["prefill_steps"] / total if total else float("nan")
        print(f"{r['round']:>3} {r['streams']:>7} {r['mode']:<16} {s['decode_steps']:>11} {s['decode_ms']:>7.1f} "
              f"{s['prefill_steps']:>9} {s['prefill_ms']:>7.1f} {share:>6.0%} {s['prompt_tokens_per_prefill_step']:>15.0f}")


def vllm_ready(python: str | None) -> bool:
    if not python:
        print("--compare-vllm needs --vllm-python (see the docstring for the install); skipped", file=sys.stderr)
        return False
    if subprocess.run([python, "-c", "import vllm"], check=False, capture_output=True).returncode != 0:
        print(f"--compare-vllm: no vllm in {python}; skipped (see the docstring for the install)", file=sys.stderr)
        return False
    return True
