"""Where each supported architecture keeps the parts a balcony needs.

Balcony never forks a modeling file. Every supported model is run by its own transformers
code; this table only says where to find the decoder stack, its layer list and its final
norm, and what the causal-LM wrapper applies after the head. Supporting a new architecture
is one entry here (and a tiny-config test).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedArchitectureError


@dataclass(frozen=True)
class ArchitectureSpec:
    decoder: str = "model"  # attribute of the *ForCausalLM holding the decoder stack
    layers: str = "layers"  # attribute of the decoder: ModuleList of decoder layers
    norm: str = "norm"  # attribute of the decoder: the final norm
    # config attribute of a soft cap applied to the logits after the head (Gemma 2), if any
    logit_softcap: str | None = None


_LLAMA_LIKE = ArchitectureSpec()

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": ArchitectureSpec(logit_softcap="final_logit_softcapping"),
    "gemma3_text": ArchitectureSpec(logit_softcap="final_logit_softcapping"),  # Gemma 3 text-only (270M, 1B)
    "gpt2": ArchitectureSpec(decoder="transformer", layers="h", norm="ln_f"),
}


@dataclass
class BaseParts:
    """The resolved parts of one loaded base model."""

    spec: ArchitectureSpec
    decoder: nn.Module
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def cap_logits(self, logits, config):
        """What the base applies to the head's output (Gemma 2's soft-capping); identity for most bases."""
        cap = getattr(config, self.spec.logit_softcap, None) if self.spec.logit_softcap else None
        return torch.tanh(logits / cap) * cap if cap else logits


def resolve(base: nn.Module) -> BaseParts:
    """Find the decoder, layers, final norm and head of `base`, or say what is missing."""
    config = getattr(base, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} ({type(base).__name__}) is not supported. Supported: "
            f"{', '.join(sorted(ARCHITECTURES))}. To add it, put an ArchitectureSpec entry in "
            "balcony.core.architectures.ARCHITECTURES naming its decoder, layer list and final norm."
        )
    spec = ARCHITECTURES[model_type]
    decoder = getattr(base, spec.decoder, None)
    if not isinstance(decoder, nn.Module):
        raise UnsupportedArchitectureError(
            f"{type(base).__name__} has no decoder module at `.{spec.decoder}`; is it a *ForCausalLM model?"
        )
    layers = getattr(decoder, spec.layers, None)
    if not isinstance(layers, nn.ModuleList) or len(layers) < 2:
        raise UnsupportedArchitectureError(
            f"{type(decoder).__name__} has no list of decoder layers at `.{spec.layers}` "
            "(a ModuleList of at least 2 layers is needed)"
        )
    norm = getattr(decoder, spec.norm, None)
    if not isinstance(norm, nn.Module):
        raise UnsupportedArchitectureError(f"{type(decoder).__name__} has no final norm at `.{spec.norm}`")
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    if not isinstance(head, nn.Module):
        raise UnsupportedArchitectureError(f"{type(base).__name__} has no LM head (get_output_embeddings() is None)")
    return BaseParts(spec=spec, decoder=decoder, layers=layers, norm=norm, head=head)
