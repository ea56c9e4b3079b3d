"""Where one decode step of the full model goes: balcony's serving engine vs plain transformers `generate`.

At each batch size (`--batches 1,8`, ~64-token chat prompts from the held-out chats, as
`serve_load.py --compare-vllm` sends) it measures, in milliseconds per decode step:
  engine parts   the engine's own pieces driven directly (serving.runner / sampler / output), one step
                 split into the model forward (trunk spans, the head, the runner's own glue),
                 sampling (greedy and sampled) and output processing (detokenize, stop strings);
  engine thread  a started `Engine` (no HTTP): milliseconds between a request's tokens, whose excess
                 over the parts is the scheduler loop's overhead and, on a machine with few cores, the
                 engine's decode threads (every core but one) against the parts' (every core);
  HTTP           `balcony serve` in its own process, streaming (`exit_layer: full`): the excess over
                 the engine thread is HTTP, SSE and the threads around them;
  plain          transformers `generate` on the base (dynamic cache; static cache), the base's bare
                 forward with a dynamic cache, with packed products and with PyTorch's own linears
                 (`core.kernels`), and in a subprocess bounded by --compile-timeout its bare
                 forward on a static cache with PyTorch's own linears, eager and compiled by
                 torch.compile (inductor, weights frozen: what vLLM's CPU backend runs), side by side;
  profile        torch.profiler over decode steps of the runner and of the bare forward: the share of
                 the step inside ATen ops by kind (matmul, attention, copies/cat, elementwise), and
                 what is left (Python and dispatch).
Every part is bounded in steps and time and stops by itself.

    python benchmarks/decode_breakdown.py                  # default model, batches 1 and 8
    python benchmarks/decode_breakdown.py --batches 1 --no-compile --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import torch
from vllm_compare import closed_loop, pct, sized_prompts  # beside this script

from balcony import BalconyModel

PROMPTS = 64  # the same prompts for every measurement, also in the compiled run's subprocess


def chat_ids(model, prompts: list[str]) -> list[list[int]]:
    tok = model.tokenizer
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


class Timed:
    """Calls `fn`, adding its wall time to `totals[name]`."""

    def __init__(self, fn, name: str, totals: dict):
        self.fn, self.name, self.totals = fn, name, totals

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        self.totals[self.name] += time.perf_counter() - start
        return out

    def __getattr__(self, name):  # the runner also asks a span for new_cache()
        return getattr(self.fn, name)


def eos_and_pad(model) -> tuple[set[int], int]:
    """The end-of-sequence ids and the padding id, as the engine takes them."""
    eos = model.base.generation_config.eos_token_id if model.base.generation_config else None
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    eos |= {model.tokenizer.eos_token_id} - {None}
    pad = model.tokenizer.pad_token_id
    return eos, pad if pad is not None else min(eos)


@torch.inference_mode()
def engine_parts(model, ids: list[list[int]], steps: int, temperature: float) -> dict:
    """One decode step of the engine's pieces (serving.runner, .sampler, .output), driven directly,
    full model: ms per step by part."""
    from balcony.serving.job import Job
    from balcony.serving.output import Output
    from balcony.serving.runner import MixedRunner
    from balcony.serving.sampler import pick

    eos, pad = eos_and_pad(model)
    runner, output, totals = MixedRunner(model), Output(model.tokenizer, threading.Lock(), eos), defaultdict(float)
    jobs = [Job(list(p), steps + 2, None, temperature=temperature, ignore_eos=True, seed=i) for i, p in enumerate(ids)]
    generators = [torch.Generator().manual_seed(i) if temperature else None for i in range(len(ids))]
    rows, logits = runner.prefill([j.prompt_ids for j in jobs], [None] * len(jobs), pad)
    tokens, _ = pick(logits.float(), jobs, generators, eos)
    runner.trunk = [Timed(span, "trunk spans", totals) for span in runner.trunk]
    model.logits = Timed(model.logits, "head", totals)
    try:
        for step in range(steps + 1):
            if step == 1:  # the first step warms up
                totals.clear()
            t0 = time.perf_counter()
            logits = runner.step(rows, tokens)
            t1 = time.perf_counter()
            tokens, entries = pick(logits.float(), jobs, generators, eos)
            t2 = time.perf_counter()
            for job, token, entry in zip(jobs, tokens.tolist(), entries):
                output.advance(job, token, entry)
            t3 = time.perf_counter()
            totals["forward"] += t1 - t0
            totals["sampling"] += t2 - t1
            totals["output"] += t3 - t2
    finally:
        del model.logits  # the class's method again
    ms = {k: v * 1000 / steps for k, v in totals.items()}
    ms["runner glue"] = ms["forward"] - ms["trunk spans"] - ms["head"]
    ms["step"] = ms["forward"] + ms["sampling"] + ms["output"]
    return ms


def engine_thread(model, ids: list[list[int]], steps: int) -> float:
    """A started Engine (no HTTP), greedy: median over requests of ms between their text deltas."""
    from balcony.serving.engine import Engine, Job

    engine = Engine(model, max_batch_size=len(ids), max_queue=len(ids))
    engine.start(calibrate=False)
    done = threading.Semaphore(0)
    stamps: list[list[tuple[float, int]]] = [[] for _ in ids]

    def emit_for(i: int):
        def emit(kind, payload):
            if kind == "delta":
                stamps[i].append((time.perf_counter(), payload[1]))
            elif kind in ("done", "error"):
                done.release()
        return emit

    try:
        for warm in (True, False):
            stamps = [[] for _ in ids]
            for i, p in enumerate(ids):
                engine.submit(Job(list(p), 4 if warm else steps + 1, None, ignore_eos=True, emit=emit_for(i)))
            for _ in ids:
                done.acquire(timeout=300)
    finally:
        engine.stop(drain=False, timeout=30)
    per = [(s[-1][0] - s[0][0]) * 1000 / (s[-1][1] - s[0][1]) for s in stamps if len(s) > 1 and s[-1][1] > s[0][1]]
    return statistics.median(per)


def through_http(args, prompts: list[str], batches: list[int], steps: int) -> dict[int, float]:
    """`balcony serve` in its own process: ITL p50 of `batch` concurrent greedy streams, each batch size."""
    from serve_load import free_port, start_server, stop_server
    from vllm_compare import body_maker

    port = free_port()
    proc = start_server([sys.executable, "-m", "balcony", "serve", args.artifact, "--port", str(port),
                         "--model-name", "balcony", "--max-batch-size", str(max(batches))], port, "balcony serve")
    url, out = f"http://127.0.0.1:{port}", {}
    try:
        closed_loop(url, body_maker("balcony:full", prompts, 0, 4, 0.0), max(batches), 0.0, 120)  # warm-up
        for b in batches:
            results, _ = closed_loop(url, body_maker("balcony:full", prompts, 0, steps + 1, 0.0), b, 0.0, 300)
            itl = [(r["stamps"][-1] - r["stamps"][0]) * 1000 / (r["usage"]["completion_tokens"] - 1)
                   for r in results if r["ok"] and r["usage"]]
            out[b] = pct(itl, 0.5)
    finally:
        stop_server(proc)
    return out


def left_padded(model, ids: list[list[int]]) -> dict:
    width = max(len(p) for p in ids)
    pad = model.tokenizer.pad_token_id
    return {"input_ids": torch.tensor([[pad] * (width - len(p)) + p for p in ids]),
            "attention_mask": torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])}


@torch.inference_mode()
def generate_step(base, inputs: dict, steps: int, **options) -> float:
    """`generate`'s ms per decode step: (time of steps+1 tokens - time of 1) / steps, after a warm-up."""
    def run(n: int):
        return base.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=base.generation_config.pad_token_id or 2, **options)

    run(3)
    times = {}
    for n in (1, steps + 1):
        start = time.perf_counter()
        run(n)
        times[n] = time.perf_counter() - start
    return (times[steps + 1] - times[1]) * 1000 / steps


@torch.inference_mode()
def bare_forward(base, inputs: dict, steps: int, profile: bool = False):
    """The base's own forward with a dynamic cache, one token a step: ms per step (or the profiler)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=base.config)
    mask = inputs["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = base(**inputs, position_ids=positions, past_key_values=cache, use_cache=True)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None
    with prof or torch.no_grad():
        start = time.perf_counter()
        for _ in range(steps):
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            positions = positions[:, -1:] + 1
            out = base(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache,
                       use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
        wall = (time.perf_counter() - start) * 1000 / steps
    return (prof, wall) if profile else wall


KINDS = {"matmul": ("mm", "addmm", "bmm", "matmul", "linear", "_linear_pointwise"),  # the last: packed (core.kernels)
         "attention": ("scaled_dot_product", "_flash_attention", "softmax"),
         "copies/cat": ("cat", "copy_", "index", "index_select", "clone", "contiguous", "zeros", "empty", "stack",
                        "to", "_to_copy", "slice", "select", "view", "expand", "reshape", "transpose", "unsqueeze")}


def op_shares(prof, wall_ms: float, steps: int) -> dict:
    """ms per step inside ATen ops by kind (self time, so nested ops count once), and the rest."""
    kinds: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if not e.key.startswith(("aten::", "mkldnn::")):
            continue
        name = e.key.split("::", 1)[1]
        kind = next((k for k, names in KINDS.items() if name in names or any(n in name for n in names[:3])),
                    "elementwise/other")
        kinds[kind] += e.self_cpu_time_total / 1000 / steps
    kinds["Python + dispatch (rest)"] = wall_ms - sum(kinds.values())
    kinds["profiled step"] = wall_ms
    return dict(kinds)


@torch.inference_mode()
def runner_profile(model, ids: list[list[int]], steps: int) -> dict:
    """torch.profiler over the runner's decode steps (full model, greedy)."""
    from balcony.serving.runner import MixedRunner

    runner = MixedRunner(model)
    rows, logits = runner.prefill([list(p) for p in ids], [None] * len(ids), eos_and_pad(model)[1])
    tokens = runner.step(rows, logits.argmax(-1)).argmax(-1)  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            tokens = runner.step(rows, tokens).argmax(-1)
        wall = (time.perf_counter() - start) * 1000 / steps
    return op_shares(prof, wall, steps)


def compiled_forward(args, batch: int) -> dict | None:
    """The bare forward on a static cache, eager and torch.compile'd, in a subprocess bounded by --compile-timeout."""
    cmd = [sys.executable, __file__, "--artifact", args.artifact, "--steps", str(args.steps),
           "--only-compiled", str(batch)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.compile_timeout, check=False)
    except subprocess.TimeoutExpired:
        print(f"compiled forward, batch {batch}: over {args.compile_timeout:.0f} s; skipped", file=sys.stderr)
        return None
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        print(f"compiled forward failed: {out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1])


@torch.inference_mode()
def static_forward(base, inputs: dict, steps: int, step_fn=None) -> tuple[float, float]:
    """The base's bare forward on a static cache, one token a step, every shape fixed (the padding mask
    spans the whole cache; causality comes from the cache positions), so a compiled step traces once.
    Returns ms per step after 3 warm-up steps, and the seconds those warm-up steps took (compiling)."""
    from transformers import StaticCache

    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    rows, width = ids.shape
    cache = StaticCache(config=base.config, max_cache_len=width + steps + 4)
    full = torch.cat([mask, mask.new_ones(rows, steps + 4)], 1)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = base(input_ids=ids, attention_mask=full[:, :width], position_ids=positions, past_key_values=cache,
               use_cache=True, cache_position=torch.arange(width))
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    positions = positions[:, -1:]

    def step(token, positions, column):
        out = base(input_ids=token, attention_mask=full, position_ids=positions, past_key_values=cache,
                   use_cache=True, cache_position=column)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    step_fn = step_fn(step) if step_fn else step
    start = time.perf_counter()
    for i in range(steps + 3):
        if i == 3:
            warm, start = time.perf_counter() - start, time.perf_counter()
        positions = positions + 1
        token = step_fn(token, positions, torch.tensor([width + i]))
    return (time.perf_counter() - start) * 1000 / steps, warm


def only_compiled(args) -> None:
    # inductor packs the weights itself when it freezes them (and cannot lower core.kernels' packed
    # products), so the base runs PyTorch's own linears here, eager and compiled alike
    model = BalconyModel.from_pretrained(args.artifact).set_kernels("eager").eval()
    ids = chat_ids(model, sized_prompts(model.tokenizer, PROMPTS, 64)[:args.only_compiled])
    inputs = left_padded(model, ids)
    eager, _ = static_forward(model.base, inputs, args.steps)
    from torch._inductor import config as inductor

    inductor.freezing = True  # this subprocess's own setting (torch.compile's options do not reach it)
    compiled, warm = static_forward(model.base, inputs, args.steps, lambda fn: torch.compile(
        fn, dynamic=False, fullgraph=True))
    print(json.dumps({"eager": eager, "compiled": compiled, "compile s": warm}))


def measure(model, args, batch: int, prompts: list[str]) -> dict:
    ids = chat_ids(model, prompts[:batch])
    inputs = left_padded(model, ids)
    row = {"batch": batch, "prompt_tokens": statistics.mean(len(p) for p in ids)}
    row["parts greedy"] = engine_parts(model, ids, args.steps, 0.0)
    row["parts sampled"] = engine_parts(model, ids, args.steps, 0.7)
    row["engine thread"] = engine_thread(model, ids, args.steps)
    row["generate"] = generate_step(model.base, inputs, args.steps)
    row["generate static"] = generate_step(model.base, inputs, args.steps, cache_implementation="static")
    row["bare forward"] = bare_forward(model.base, inputs, args.steps)
    kind = model.kernels
    model.set_kernels("eager")  # PyTorch's own linears, the same forward, for the packed products' worth
    row["bare forward eager"] = bare_forward(model.base, inputs, args.steps)
    model.set_kernels(kind)
    row["profile runner"] = runner_profile(model, ids, args.steps)
    prof, wall = bare_forward(model.base, inputs, args.steps, profile=True)
    row["profile bare forward"] = op_shares(prof, wall, args.steps)
    row["static forward"] = compiled_forward(args, batch) if args.compile else None
    print(f"batch {batch} measured", file=sys.stderr, flush=True)
    return row


def report(rows: list[dict]) -> None:
    bs = [r["batch"] for r in rows]
    head = f"{'ms per decode step, full model':<44}" + "".join(f"{'batch ' + str(b):>10}" for b in bs)
    print(f"\n{head}\n{'-' * len(head)}")

    def line(name: str, get) -> None:
        vals = [get(r) for r in rows]
        print(f"{name:<44}" + "".join(f"{'-' if v is None else f'{v:.1f}':>10}" for v in vals))

    def parts(k: str, mode: str = "greedy"):
        return lambda r: r[f"parts {mode}"].get(k)

    def static(k: str):  # None where the compiled run was skipped or failed
        return lambda r: r["static forward"] and r["static forward"][k]

    line("engine: model forward", parts("forward"))
    line("  trunk spans (30 layers in 4 spans + norm)", parts("trunk spans"))
    line("  head (49k-way lm_head)", parts("head"))
    line("  runner glue (masks, indices, stack)", parts("runner glue"))
    line("engine: sampling, greedy", parts("sampling"))
    line("engine: sampling, sampled T=0.7", parts("sampling", "sampled"))
    line("engine: output processing (detokenize)", parts("output"))
    line("engine: parts together (greedy)", parts("step"))
    line("engine thread: between tokens (no HTTP)", lambda r: r["engine thread"])
    line("  scheduler loop overhead (thread - parts)", lambda r: r["engine thread"] - r["parts greedy"]["step"])
    line("HTTP server: ITL p50", lambda r: r.get("http"))
    line("  HTTP + SSE (server - engine thread)", lambda r: r.get("http") and r["http"] - r["engine thread"])
    line("plain generate, dynamic cache", lambda r: r["generate"])
    line("plain generate, static cache", lambda r: r["generate static"])
    line("bare forward + argmax, static cache, eager", static("eager"))
    line("  the same, torch.compile (inductor, frozen)", static("compiled"))
    line("  its compile (first steps, seconds)", static("compile s"))
    line("bare base forward + argmax, dynamic cache", lambda r: r["bare forward"])
    line("  the same with PyTorch's own linears", lambda r: r["bare forward eager"])
    for name in ("profile runner", "profile bare forward"):
        print(f"\n{name} (torch.profiler, ms per step; profiling slows Python)")
        for kind in rows[0][name]:
            line(f"  {kind}", lambda r, k=kind, n=name: r[n].get(k))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifact", default="default")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per measurement")
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile run")
    p.add_argument("--compile-timeout", type=float, default=420, help="seconds for each compiled run at most")
    p.add_argument("--no-http", dest="http", action="store_false", help="skip the server measurement")
    p.add_argument("--json", help="also write the figures to this file")
    p.add_argument("--only-compiled", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.only_compiled:
        return only_compiled(args)
    model = BalconyModel.from_pretrained(args.artifact).eval()
    batches = [int(b) for b in args.batches.split(",")]
    prompts = sized_prompts(model.tokenizer, max(PROMPTS, *batches), 64)
    rows = [measure(model, args, b, prompts) for b in batches]
    if args.http:
        for b, itl in through_http(args, prompts, batches, args.steps).items():
            next(r for r in rows if r["batch"] == b)["http"] = itl
    report(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
