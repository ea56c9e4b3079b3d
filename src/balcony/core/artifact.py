"""The artifact on disk: balcony_config.json, balcony_model.safetensors and an optional speed profile.

Only the balconies are stored, never the base (as a peft adapter). Everything that can be
wrong with an artifact is found here and named with its fix: a missing or corrupt file, a
base of another shape or other weights, tensors that do not match the config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..version import __version__
from ..default import DEFAULT_NAME, artifact_path, cache_root
from .config import CONFIG_NAME, WEIGHTS_NAME, BalconyConfig, base_shape, fingerprint_weights
from .errors import ArtifactError, BaseMismatchError

PROFILE_NAME = "bench_profile.json"  # written by `balcony bench` beside an artifact
_LEGACY_KEY = re.compile(r"^(\d+)\.layer\.")  # before multi-layer balconies the one layer was "E.layer.*"


def read_config(artifact: str | os.PathLike) -> tuple[Path, BalconyConfig]:
    directory = artifact_path(artifact)
    config = BalconyConfig.load(directory)
    if not (directory / WEIGHTS_NAME).is_file():
        raise ArtifactError(f"{directory / WEIGHTS_NAME} not found: the artifact is incomplete; save it again with save_pretrained")
    return directory, config


def check_base(config: BalconyConfig, base: nn.Module, directory: Path, *, verify_weights: bool) -> None:
    """The base must have the recorded shape, and (unless told otherwise) the recorded weights."""
    found = base_shape(base.config)
    diffs = {k: (v, found.get(k)) for k, v in config.base_shape.items() if found.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: artifact {a!r} vs base {b!r}" for k, (a, b) in diffs.items())
        raise BaseMismatchError(f"these balconies were made for a different base ({config.base_model}): {detail}. "
                                "Load them onto the recorded base.")
    if verify_weights and config.base_fingerprint:
        fingerprint = fingerprint_weights(base)
        if fingerprint != config.base_fingerprint:
            raise BaseMismatchError(
                f"the balconies in {directory} were trained on a base with weight fingerprint "
                f"{config.base_fingerprint} ({config.base_model}), but the given base has {fingerprint}: its weights differ. "
                "Load the recorded base, or pass verify_base=False (CLI: --no-verify-base) if you know it is compatible."
            )


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_weights(directory: Path, expected: dict[str, torch.Tensor], sha256: str | None = None) -> dict[str, torch.Tensor]:
    """The stored balcony tensors, checked against the sha256 the config recorded (a flipped bit in a
    tensor would otherwise load as a silently different model) and the state dict the config implies."""
    path = directory / WEIGHTS_NAME
    if sha256 is not None and file_sha256(path) != sha256:
        raise ArtifactError(f"{path} is damaged (corrupt or truncated): its sha256 differs from the one {CONFIG_NAME} recorded when it was "
                            "saved (a changed, truncated or replaced file); save or download the artifact again")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"{path} is corrupt or truncated ({err}); save or download the artifact again") from err
    state = {_LEGACY_KEY.sub(r"\1.layers.0.", k): v for k, v in state.items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ArtifactError(f"{path} does not match {CONFIG_NAME}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                            "the artifact is corrupt or was edited")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise BaseMismatchError(f"{path}: tensor {key} has shape {tuple(tensor.shape)}, "
                                    f"the base needs {tuple(expected[key].shape)}")
    return state


def write(directory: str | os.PathLike, state: dict[str, torch.Tensor], config: BalconyConfig,
          dtype: torch.dtype | None = None) -> None:
    """Write the tensors and the config; the weights land under their name only once complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    tmp = directory / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "balcony_version": __version__})
    config.weights_sha256 = file_sha256(tmp)
    config.save(directory)
    # safetensors writes owner-only files: give the weights the mode the config got (umask),
    # so an artifact saved by one user can be served by another
    shutil.copymode(directory / CONFIG_NAME, tmp)
    os.replace(tmp, directory / WEIGHTS_NAME)


def speed_profile_path(artifact: str | os.PathLike, *, for_writing: bool = True) -> Path:
    """Where `balcony bench` stores an artifact's speed profile: beside it, except for the shipped
    `default` artifact, whose own profile (measured when it was made) sits inside the installed
    package; a profile measured on this machine goes to the cache and wins over the shipped one."""
    if str(artifact) != DEFAULT_NAME:
        return Path(artifact) / PROFILE_NAME
    local = cache_root() / "profiles" / f"default-{PROFILE_NAME}"
    return local if for_writing or local.is_file() else artifact_path(artifact) / PROFILE_NAME


def _profile_digest(profile: dict) -> str:
    body = {k: v for k, v in profile.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_profile(path: Path, profile: dict) -> None:
    """Store a speed profile with the sha256 of its content, atomically (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**profile, "sha256": _profile_digest(profile)}, indent=2) + "\n")
    os.replace(tmp, path)


def load_profile(artifact: str | os.PathLike, config: BalconyConfig) -> dict | None:
    """The speed profile `balcony bench` stored for `artifact`, if it was measured on balconies of
    this shape (exits and layers per exit): a profile of other balconies (e.g. a cached one of an
    earlier `default`) would misplace every latency target, so it is set aside with a warning."""
    path = speed_profile_path(artifact, for_writing=False)
    if not path.is_file():
        return None
    try:
        profile = json.loads(path.read_text())
        damaged = not isinstance(profile, dict) or profile.get("sha256", _profile_digest(profile)) != _profile_digest(profile)
    except (json.JSONDecodeError, UnicodeDecodeError):
        damaged = True
    if damaged:  # it only costs max_ms_per_token; budgets and exits still work
        warnings.warn(f"the speed profile {path} is damaged (not the JSON `balcony bench` wrote): ignored; run "
                      f"`balcony bench {artifact}` to measure it again", stacklevel=3)
        return None
    if profile.get("balconies") != config.shape():
        warnings.warn(f"the speed profile {path} was measured on other balconies ({profile.get('balconies')}, these "
                      f"are {config.shape()} as exit: layers): ignored; run `balcony bench {artifact}` to measure "
                      "these", stacklevel=3)
        return None
    return profile
