"""What one `BalconyModel.generate` call returns, and the registry of its decoding modes.

A call's results travel with its output, never on the model: `return_dict_in_generate=True`
gives a `BalconyGenerateOutput`, transformers' own decoder-only output (sequences, and the
scores, logits, ... it was asked for) plus the exit that ran and a mode's statistics. Two
threads sharing one model each read their own.

Modes (`generate(mode=...)`) are decoders that pick their own depth per token; the decoding
package registers them here so that core never imports anything above it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers.generation.utils import GenerateDecoderOnlyOutput

from .errors import ExitError


@dataclass
class BalconyGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' `GenerateDecoderOnlyOutput` plus what balcony decided for this call.

    `exit_layer`: the exit the tokens were generated at (None: the full model, and for the
    modes, which mix depths or reproduce the full model). `mode`: "speculative", "dynamic" or
    None. `stats`: the mode's statistics (acceptance rate, exit shares, ...), else None.
    """

    exit_layer: int | None = None
    mode: str | None = None
    stats: dict | None = None


# generate(mode=...) decoders: name -> (options it takes, function)
_MODES: dict[str, tuple[frozenset, Callable]] = {}


def register_mode(name: str, options: set[str], run: Callable) -> None:
    """Make `generate(mode=name)` call `run(model, input_ids, max_new_tokens=, eos_token_id=,
    pad_token_id=, **options) -> (sequences, stats)`; `options` are the keywords it accepts."""
    _MODES[name] = (frozenset(options), run)


def generate_in_mode(model, mode: str, input_ids=None, *, max_new_tokens: int | None = None, eos_token_id=None,
                     pad_token_id=None, return_dict_in_generate: bool = False, **options):
    """Run a registered mode with the base's generation defaults; the sequences, or a
    `BalconyGenerateOutput` carrying the mode's statistics when `return_dict_in_generate`."""
    if mode not in _MODES:
        raise ExitError(f"unknown generation mode {mode!r}: use one of {sorted(_MODES)} (or no mode)")
    accepted, run = _MODES[mode]
    input_ids = options.pop("inputs", input_ids) if input_ids is None else input_ids
    unknown = set(options) - accepted
    if unknown:
        raise ExitError(f"mode={mode!r} does not take {sorted(unknown)}; it takes {sorted(accepted)}")
    config = model.base.generation_config
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    sequences, stats = run(model, input_ids, max_new_tokens=max_new_tokens or config.max_new_tokens or 20,
                           eos_token_id=eos[0] if isinstance(eos, (list, tuple)) else eos,
                           pad_token_id=config.pad_token_id if pad_token_id is None else pad_token_id, **options)
    if not return_dict_in_generate:
        return sequences
    return BalconyGenerateOutput(sequences=sequences, exit_layer=None, mode=mode, stats={"mode": mode, **stats})

