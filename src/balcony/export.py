"""Export one exit as a standard Hugging Face checkpoint of the base's own architecture.

The result has e+n layers (layers[:e] + the balcony's n layers, usually 1), the balcony's norm as final
norm and the shared head, plus the tokenizer: plain `AutoModelForCausalLM.from_pretrained`
(and so vLLM, TGI or a llama.cpp conversion) serves it with no balcony code, and it can be a
small draft model for another engine's speculative decoding.

The exit model already *is* that model, an object of the base's class with a config cut to e+n
layers, so exporting is transformers' own `save_pretrained` called on it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .core.errors import ExitError
from .core.model import BalconyModel


def export(model: BalconyModel, exit_layer: int | str, out: str | os.PathLike) -> Path:
    exit_layer = model.policy.check_exit(exit_layer)
    if exit_layer is None:
        raise ExitError("the full model needs no export: it is the base checkpoint itself")
    out = Path(out)
    sub_model = model.exit_model(exit_layer)
    sub_model.config.name_or_path = f"{model.balcony_config.base_model} (balcony exit {exit_layer})"
    sub_model.save_pretrained(out)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(out)
    return out
