"""BalconyConfig: what an artifact records about its balconies and the base they belong to."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .errors import ArtifactError

CONFIG_NAME = "balcony_config.json"
WEIGHTS_NAME = "balcony_model.safetensors"
INITS = ("copy", "next", "random")

# Config fields that decide the shapes a balcony must have; a base that differs in any of
# them cannot take the balconies at all.
_SHAPE_FIELDS = (
    "model_type",
    "num_hidden_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
)


@dataclass
class BalconyConfig:
    exits: list[int]
    # "copy": the last base layer + final norm (the paper's); "next": the base layers from the exit
    # on (the trunk continued) + final norm; "random": N(0, init range), unit norms
    init: str = "copy"
    base_model: str | None = None  # hub id, local path or "default"
    base_shape: dict = field(default_factory=dict)  # the base config fields in _SHAPE_FIELDS
    base_fingerprint: str | None = None  # hash of sampled base weights (see fingerprint_weights)
    num_layers: int | None = None
    balcony_version: str | None = None
    # Decoder layers per balcony: one number for every exit, or {exit: n} (exits not named: 1).
    # 1 is the paper's balcony; more buy quality at an exit for one more layer of compute each
    # (see `sources` for their init).
    balcony_layers: int | dict[str, int] = 1
    weights_sha256: str | None = None  # of the weights file as written: a damaged file is refused, never loaded

    def __post_init__(self):
        self.exits = sorted({int(e) for e in self.exits})
        if not self.exits:
            raise ValueError("a BalconyConfig needs at least one exit")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, not {self.init!r}")
        counts = self.balcony_layers.values() if isinstance(self.balcony_layers, dict) else [self.balcony_layers]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in counts):
            raise ValueError(f"balcony_layers must be a positive integer or {{exit: positive integer}}, "
                             f"not {self.balcony_layers!r}")
        if isinstance(self.balcony_layers, dict):
            self.balcony_layers = {str(int(e)): n for e, n in self.balcony_layers.items()}
            unknown = set(self.balcony_layers) - {str(e) for e in self.exits}
            if unknown:
                raise ValueError(f"balcony_layers names exits {sorted(unknown, key=int)} that have no balcony ({self.exits})")

    def layers_at(self, exit_layer: int) -> int:
        """Decoder layers in the balcony at `exit_layer`."""
        if isinstance(self.balcony_layers, dict):
            return self.balcony_layers.get(str(exit_layer), 1)
        return self.balcony_layers

    def sources(self, exit_layer: int) -> list[int]:
        """The base layer each layer of balcony(exit_layer) is a twin of (its kind and its copy init).

        The last is the base's *last* layer (the paper's choice: the layer a balcony replaces, the
        final step before the norm and head); layers before it continue the trunk (layers e,
        e+1, ...), so a deeper balcony starts as "a few more base layers, then the last one".
        With init "next" every layer continues the trunk (layers e, e+1, ..., e+n-1).
        """
        last = self.num_layers - 1
        trunk = [min(exit_layer + i, last) for i in range(self.layers_at(exit_layer))]
        return trunk if self.init == "next" else trunk[:-1] + [last]

    def shape(self) -> dict[str, int]:
        """{exit: decoder layers}: what an exit's speed depends on (a speed profile records it)."""
        return {str(e): self.layers_at(e) for e in self.exits}

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | Path) -> None:
        """Write balcony_config.json atomically (a temporary file, then a rename)."""
        tmp = Path(directory) / (CONFIG_NAME + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, Path(directory) / CONFIG_NAME)

    @classmethod
    def load(cls, directory: str | Path) -> BalconyConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise ArtifactError(
                f"{path} not found: {directory} is not a balcony artifact (save one with BalconyModel.save_pretrained)"
            )
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArtifactError(f"{path} is not valid JSON ({err}); the artifact is corrupt, save it again") from err
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ArtifactError(
                f"{path} has unknown fields {sorted(unknown)}: written by a newer balcony? Upgrade balcony."
            )
        try:
            return cls(**data)
        except (TypeError, ValueError) as err:
            raise ArtifactError(f"{path} is invalid: {err}") from err


def base_shape(config) -> dict:
    shape = {}
    for name in _SHAPE_FIELDS:
        value = getattr(config, name, None)
        if value is not None:
            shape[name] = value
    return shape


@torch.no_grad()
def fingerprint_weights(model: nn.Module, samples_per_tensor: int = 1024) -> str:
    """A cheap, dtype-independent hash of a model's weights.

    Hashing every byte of a multi-GB model on each load would cost seconds to minutes, so each
    parameter contributes its name, shape and about a thousand evenly spaced values, rounded to
    bfloat16 so the same weights loaded in fp32, fp16 or bf16 give the same fingerprint.
    """
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = param.detach().reshape(-1)
        count = min(samples_per_tensor, flat.numel())
        index = torch.arange(count, device=flat.device) * (flat.numel() - 1) // max(count - 1, 1)
        values = flat[index].to(torch.float32).to(torch.bfloat16).view(torch.int16).cpu().numpy()
        digest.update(name.encode())
        digest.update(str(tuple(param.shape)).encode())
        digest.update(values.tobytes())
    return digest.hexdigest()[:32]
