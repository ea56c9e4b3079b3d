"""The same levels from a third-party load generator: NVIDIA's aiperf (PyPI), in its own venv.

`serve_load.py --compare-vllm --loadgen ~/aiperf-env/bin/aiperf` calls `loadgen_levels` against each
warm server of each round, after its own clients. For one server and mode it runs, as a user would:

    aiperf profile --model balcony:full --url http://127.0.0.1:PORT --endpoint-type chat --streaming \\
        --tokenizer ~/.cache/balcony/smollm2-135m-instruct --concurrency 1,8,32 \\
        --benchmark-duration 20 --benchmark-grace-period 120 \\
        --prompt-input-tokens-mean 64 --prompt-input-tokens-stddev 0 \\
        --prompt-output-tokens-mean 32 --prompt-output-tokens-stddev 0 \\
        --extra-inputs ignore_eos:true --extra-inputs temperature:0 --use-server-token-count \\
        --random-seed 1 --no-auto-plot --output-artifact-dir DIR

(vLLM's server gets `--model balcony`; sampled rows `temperature:0.7`). The local tokenizer folder
keeps it off any model hub; do not set HF_HUB_OFFLINE, under which aiperf 0.13 accepts only a hub
cache entry, not a folder. Its synthetic prompts are 64 tokens of its own corpus before the chat
template; output tokens are the servers' `usage`; TTFT and inter-token latency are per request,
as it reports them (p50/p95 over requests); output tok/s is its total over the benchmark duration.
aiperf runs several processes of its own, on the same 2 cores as the server it loads.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path


def aiperf_command(args, url: str, model_name: str, temperature: float, out: Path) -> list[str]:
    return [args.loadgen, "profile", "--model", model_name, "--url", url, "--endpoint-type", "chat", "--streaming",
            "--tokenizer", args.base, "--concurrency", ",".join(str(c) for c in args.levels),
            "--benchmark-duration", str(args.duration), "--benchmark-grace-period", str(args.time_limit),
            "--prompt-input-tokens-mean", str(args.prompt_tokens), "--prompt-input-tokens-stddev", "0",
            "--prompt-output-tokens-mean", str(args.max_tokens), "--prompt-output-tokens-stddev", "0",
            "--extra-inputs", "ignore_eos:true", "--extra-inputs", f"temperature:{temperature}",
            "--use-server-token-count", "--random-seed", "1", "--no-auto-plot", "--output-artifact-dir", str(out)]


def aiperf_row(path: Path, **labels) -> dict:
    """One level's profile_export_aiperf.json as a row of the comparison's table."""
    d = json.loads(path.read_text())

    def stat(key: str, q: str) -> float:
        return float((d.get(key) or {}).get(q, float("nan")))

    errors = (d.get("error_request_count") or {}).get("avg", 0)
    return {**labels, "requests": int(stat("request_count", "avg")), "failed": int(errors),
            "tokens": int(stat("total_output_tokens", "avg")) if d.get("total_output_tokens") else 0,
            "tok_s": stat("output_token_throughput", "avg"), "ttft_p50": stat("time_to_first_token", "p50"),
            "ttft_p95": stat("time_to_first_token", "p95"), "itl_p50": stat("inter_token_latency", "p50"),
            "itl_p95": stat("inter_token_latency", "p95"), "prompt_tokens": stat("input_sequence_length", "avg")}


def loadgen_levels(args, server: str, round_: int, url: str, model_name: str) -> list[dict]:
    """aiperf at every level, greedy then sampled, against one warm server; bounded by a timeout."""
    rows = []
    budget = len(args.levels) * (args.duration + args.time_limit + 30) + 180
    for mode, temperature in (("greedy", 0.0), ("sampled", args.temperature)):
        out = Path(tempfile.mkdtemp(prefix=f"aiperf-{server}-{round_}-{mode}-"))
        cmd = aiperf_command(args, url, model_name, temperature, out)
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=budget, check=False)
        except subprocess.TimeoutExpired:
            print(f"aiperf ({server}, {mode}): over {budget:.0f} s; stopped", file=sys.stderr)
            continue
        if done.returncode != 0:
            print(f"aiperf ({server}, {mode}) failed ({done.returncode}): {done.stdout[-3000:]}", file=sys.stderr)
        for streams in args.levels:
            path = out / f"concurrency_{streams}" / "profile_export_aiperf.json"
            if len(args.levels) == 1:
                path = out / "profile_export_aiperf.json"
            if path.exists():
                rows.append(aiperf_row(path, tool="aiperf", server=server, round=round_, streams=streams, mode=mode))
                print(f"  {fmt(rows[-1])}", file=sys.stderr, flush=True)
    return rows


def fmt(row: dict) -> str:
    from vllm_compare import fmt_row

    return fmt_row(row)
