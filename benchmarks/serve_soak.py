"""Soak test for `balcony serve`: a bounded run of mixed traffic, then what it left behind.

Starts `balcony serve` in its own process with a small `--max-queue`, then for `--seconds`
runs `--clients` closed-loop clients, each picking at random: a valid completion or chat (text
or token-id prompts, pinned exits and model names, sampling, stop strings, logprobs, echo, n), an
invalid body (broken JSON, wrong types, unknown fields, huge numbers, lone surrogates), a stream
read to its end, a stream cancelled after a few chunks, and now and then a burst of concurrent
requests past the queue (429s expected). Prints requests answered by status, 5xx (want 0), errors
sent inside streams (want 0), the server's RSS at the start (after a warm-up) and the end, and the
slots left held once the clients stop (`/health`'s load, queued and running; want 0). Exits 1 when
a 5xx, a stream error, a transport error or a held slot was seen.

    python benchmarks/serve_soak.py                          # a tiny random model it builds, 120 s
    python benchmarks/serve_soak.py --seconds 60 --json soak.json
    python benchmarks/serve_soak.py --model default          # the default model, shipped balconies
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

TEXTS = ["The quick brown fox jumps over the lazy dog.", "héllo wörld, ça va? 日本語のテキスト",
         "emoji 🎉🙂👍🏽 and flags 🇫🇷", "Numbers like 42 and 7 appear in many stories.",
         "Ελληνικά, русский, עברית, العربية", "Is this the right way to the station, please?"]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
INVALID = [b"{not json", b"", b'["a list"]', b'{"prompt": 5}', b'{"prompt": "x", "max_tokens": "5"}',
           b'{"prompt": "x", "frobnicate": 1}', b'{"prompt": "x", "temperature": 1e999}', b'{"prompt": "\\ud800"}',
           b'{"prompt": "x", "seed": 99999999999999999999999}', b'{"prompt": "x", "logit_bias": {"\xc2\xb2": 1}}',
           b'{"prompt": "x", "exit_layer": 3}', b'{"prompt": "x", "max_tokens": 100000}', b'{"prompt": [1, 2, 1000000]}',
           b'{"messages": []}', b'{"messages": [{"role": "robot", "content": "x"}]}', b'{"prompt": ' + b"[" * 3000,
           b'{"prompt": "x", "n": 0}', b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}']


def build_tiny(folder: Path) -> Path:
    """A tiny random Llama with a small byte-level BPE tokenizer (multi-byte characters split over
    tokens) and balconies at exits 2 and 4: an artifact `balcony serve` loads."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from balcony import BalconyModel

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(TEXTS * 8, trainers.BpeTrainer(
        vocab_size=384, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<pad>", "<s>", "</s>"], show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    base.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    BalconyModel.from_base(str(folder / "base"), exits=[2, 4], init="random").save_pretrained(folder / "artifact")
    return folder / "artifact"


def rss_bytes(pid: int) -> int:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss
    except ImportError:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise


class Soak:
    def __init__(self, url: str, names: list[str], seed: int):
        self.url, self.names = url, names
        self.statuses: Counter = Counter()  # (kind, status) -> count
        self.stream_errors: list[str] = []
        self.transport_errors: Counter = Counter()
        self.lock = threading.Lock()
        self.seed = seed

    def record(self, kind: str, status: int) -> None:
        with self.lock:
            self.statuses[kind, status] += 1
        if status == 429 and kind != "burst":
            time.sleep(random.uniform(0.1, 0.5))  # a client backs off before its next request

    def valid_body(self, rng: random.Random, chat: bool) -> dict:
        body = {"model": rng.choice(self.names), "max_tokens": rng.randint(1, 48)}
        text = rng.choice(TEXTS)[: rng.randint(1, 60)]
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
            if rng.random() < 0.3:
                body.update(logprobs=True, top_logprobs=rng.randint(0, 5))
        else:
            body["prompt"] = text if rng.random() < 0.8 else [rng.randint(3, 200) for _ in range(rng.randint(1, 20))]
            if rng.random() < 0.2:
                body.update(echo=True, logprobs=rng.randint(0, 3))
        if rng.random() < 0.5:
            body.update(temperature=rng.uniform(0, 1.5), top_p=rng.uniform(0.1, 1), seed=rng.randint(0, 1000))
        if rng.random() < 0.3:
            body["stop"] = [rng.choice(TEXTS)[i: i + rng.randint(1, 3)] for i in rng.sample(range(20), 2)]
        if rng.random() < 0.2:
            body["n"] = rng.randint(1, 3)
        if rng.random() < 0.2:
            body.update(presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1, min_tokens=2)
        return body

    def one(self, client: httpx.Client, rng: random.Random, kind: str) -> None:
        chat = rng.random() < 0.5
        route = "/v1/chat/completions" if chat else "/v1/completions"
        if kind == "valid":
            self.record(kind, client.post(route, json=self.valid_body(rng, chat)).status_code)
        elif kind == "invalid":
            body = rng.choice(INVALID)
            route = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
            self.record(kind, client.post(route, content=body, headers={"Content-Type": "application/json"}).status_code)
        else:  # a stream, read to its end or left after a few chunks
            body = {**self.valid_body(rng, chat), "stream": True, "stream_options": {"include_usage": True}}
            keep = rng.randint(1, 3) if kind == "cancelled" else None
            with client.stream("POST", route, json=body) as response:
                self.record(kind, response.status_code)
                for n, line in enumerate(response.iter_lines()):
                    if line.startswith("data: {") and '"error"' in line[:20]:
                        with self.lock:
                            self.stream_errors.append(line[:300])
                    if keep is not None and n >= keep:
                        break  # closing the response disconnects: the server must free the slot

    def client(self, index: int, until: float) -> None:
        rng = random.Random(self.seed * 1000 + index)
        kinds = ["valid"] * 4 + ["invalid"] * 2 + ["stream"] * 2 + ["cancelled"] * 2
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while time.monotonic() < until:
                try:
                    self.one(client, rng, rng.choice(kinds))
                except httpx.TransportError as err:
                    with self.lock:
                        self.transport_errors[type(err).__name__] += 1

    def burst(self, until: float, size: int) -> None:
        """Every few seconds, `size` requests at once: more than the queue takes (429 expected)."""
        rng = random.Random(self.seed)
        while time.monotonic() < until:
            time.sleep(rng.uniform(2, 5))
            threads = [threading.Thread(target=self._burst_one, args=(random.Random(rng.random()),)) for _ in range(size)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    def _burst_one(self, rng: random.Random) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=120) as client:
                body = {**self.valid_body(rng, False), "max_tokens": 32, "ignore_eos": True}
                self.record("burst", client.post("/v1/completions", json=body).status_code)
        except httpx.TransportError as err:
            with self.lock:
                self.transport_errors[type(err).__name__] += 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: str, port: int, max_queue: int, max_batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "balcony", "serve", artifact, "--port", str(port), "--model-name", "soak",
           "--max-queue", str(max_queue), "--max-batch-size", str(max_batch), "--max-tokens-limit", "64",
           "--max-prompt-tokens", "512"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not come up")
        time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (a random model built here), 'default', or an artifact")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--burst", type=int, default=12, help="requests sent at once now and then (past the queue)")
    parser.add_argument("--max-queue", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of traffic before the first RSS reading")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        artifact = str(build_tiny(Path(tmp))) if args.model == "tiny" else args.model
        port = free_port()
        proc = start_server(artifact, port, args.max_queue, args.max_batch_size)
        url = f"http://127.0.0.1:{port}"
        try:
            names = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
            soak = Soak(url, names, args.seed)
            start = time.monotonic()
            until = start + args.seconds
            workers = [threading.Thread(target=soak.client, args=(i, until)) for i in range(args.clients)]
            workers.append(threading.Thread(target=soak.burst, args=(until, args.burst)))
            for w in workers:
                w.start()
            time.sleep(min(args.warmup, args.seconds / 4))
            rss_start = rss_bytes(proc.pid)
            samples = [rss_start]
            while any(w.is_alive() for w in workers):
                time.sleep(1.0)
                samples.append(rss_bytes(proc.pid))
            elapsed = time.monotonic() - start
            rss_end = rss_bytes(proc.pid)
            deadline = time.monotonic() + 30  # cancelled rows leave at the next step: give them a moment
            while (health := httpx.get(url + "/health").json()) and (health["load"] or health["queued"]
                                                                       or health["running"]):
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    by_status = Counter()
    for (_, status), count in soak.statuses.items():
        by_status[status] += count
    answered = sum(by_status.values())
    server_errors = sum(c for s, c in by_status.items() if s >= 500)
    held = health["load"] + health["queued"] + health["running"]
    figures = {
        "model": args.model, "seconds": round(elapsed, 1), "clients": args.clients, "max_queue": args.max_queue,
        "requests_answered": answered, "per_second": round(answered / elapsed, 1),
        "by_status": dict(sorted(by_status.items())),
        "by_kind": {f"{k} {s}": c for (k, s), c in sorted(soak.statuses.items())},
        "5xx": server_errors, "stream_errors": len(soak.stream_errors), "transport_errors": dict(soak.transport_errors),
        "rss_start_mb": round(rss_start / 2**20, 1), "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_peak_mb": round(max(samples) / 2**20, 1), "rss_growth_mb": round((rss_end - rss_start) / 2**20, 1),
        "slots_held_at_end": health,
    }
    print(json.dumps(figures, indent=2))
    for line in soak.stream_errors[:5]:
        print("stream error:", line)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 1 if server_errors or soak.stream_errors or soak.transport_errors or held else 0


if __name__ == "__main__":
    sys.exit(main())
