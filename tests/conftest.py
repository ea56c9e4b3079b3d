"""Tiny randomly initialised models of every supported architecture, and the default model."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

NUM_LAYERS = 6
VOCAB = 96

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=NUM_LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)


def tiny_config(arch: str):
    if arch == "llama":
        return LlamaConfig(**_COMMON)
    if arch == "mistral":
        # a window shorter than the test sequences, so sliding attention is exercised
        return MistralConfig(**_COMMON, sliding_window=5)
    if arch == "qwen2":
        return Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=5, max_window_layers=3)
    if arch == "qwen3":
        return Qwen3Config(**_COMMON, head_dim=8)
    if arch == "gemma":  # embeddings scaled by sqrt(hidden), (1 + weight) RMSNorm, GeGLU
        return GemmaConfig(**_COMMON, head_dim=8)
    if arch == "gemma2":
        return Gemma2Config(
            **_COMMON, head_dim=8, sliding_window=5, final_logit_softcapping=3.0, attn_logit_softcapping=20.0
        )
    if arch == "gemma3_text":  # sliding and global layers with their own RoPE, QK-norm, four norms per layer
        return Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=5, query_pre_attn_scalar=8,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=NUM_LAYERS, n_head=4, n_positions=128,
            bos_token_id=1, eos_token_id=2, pad_token_id=0,
        )
    raise ValueError(arch)


ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "gpt2"]


def tiny_base(arch: str, seed: int = 0):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    # Random init gives near-uniform logits; sharper weights make greedy choices meaningful.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0)
    model.generation_config.pad_token_id = 0
    return model.eval()


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture(scope="session", autouse=True)
def _quiet_and_deterministic():
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(False)
    yield


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def tiny_tokenizer():
    """A character-level tokenizer whose ids fit the tiny models' vocabulary."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in string.ascii_letters + string.digits + " .,!?'-:;\n":
        vocab[char] = len(vocab)
    assert len(vocab) <= VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


@pytest.fixture
def traced_compile(monkeypatch):
    """The runner's torch.compile (`serving.runner.COMPILE`) traces the real graph but runs it without
    inductor's code generation (minutes of C++ compiling on two cores; `benchmarks/serve_load.py
    --compare-vllm --balcony-args=--compile` runs the real thing)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from balcony.serving import runner

    monkeypatch.setattr(runner, "COMPILE", {**runner.COMPILE, "backend": "aot_eager", "fullgraph": True})
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def count_compiled_steps(runner) -> list[int]:
    """Wrap `runner`'s compiled decoder; the list returned gets each call's row count."""
    compiled, calls = runner.full, []

    def counted(*args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return compiled(*args, **kwargs)

    runner.full = counted
    return calls


def save_tiny_model(arch: str, directory, seed: int = 0):
    """A tiny base with tokenizer files, as a local checkpoint folder (what a user's path looks like)."""
    base = tiny_base(arch, seed=seed)
    base.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A small model can learn to exit early.",
    "Balconies sit beside the trunk and look at the view.",
    "Every layer refines the guess of the one before it.",
    "Rain falls on the hills and runs down to the sea.",
    "She wrote the letter twice before she sent it.",
    "Numbers like 42 and 7 appear in many stories.",
    "Is this the right way to the station, please?",
]


def write_corpus(path, documents: int = 40, seed: int = 0):
    """A small plain-text corpus of shuffled sentences, one document per paragraph."""
    import random

    rng = random.Random(seed)
    paragraphs = [" ".join(rng.choice(SENTENCES) for _ in range(rng.randint(2, 5))) for _ in range(documents)]
    path.write_text("\n\n".join(paragraphs))
    return path


def assert_cached_matches_uncached(model, ids, atol: float = 1e-4, prefix: int = 4) -> None:
    """At every exit: a prefix, then one token at a time through the KV cache, equals one uncached pass."""
    for exit_layer in model.exits:
        full = model(ids, exit_layer=exit_layer).logits
        out = model(ids[:, :prefix], exit_layer=exit_layer, use_cache=True)
        cache, steps = out.cache, [out.logits]
        for t in range(prefix, ids.shape[1]):
            out = model(ids[:, t:t + 1], exit_layer=exit_layer, use_cache=True, cache=cache)
            cache, _ = out.cache, steps.append(out.logits)
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=atol, rtol=0)


def kill_when_hanging(script: str, argv: list[str], env: dict, marker, what: str) -> None:
    """Run `python -c script argv`, wait until it writes `marker` (it then hangs at its fault), and
    SIGKILL it there; fails, with its stderr, if it ends first."""
    import signal
    import subprocess
    import sys
    import time

    marker.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", script, *argv], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run ended before its fault ({what}): {proc.communicate()[1][-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
