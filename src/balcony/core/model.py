"""BalconyModel: a frozen causal LM with small trainable exit layers ("balconies").

Exit e means "the hidden state after the first e decoder layers". Balcony(e) is one extra
decoder layer of the base's own class (n of them if configured), its own copy of the base's
final norm, and the base's shared (frozen) LM head. The sub-model at exit e runs
layers[:e] + balcony(e) + head.

Two ways through the model, both reusing the base's own transformers code:

* **One exit** (`exit_model(e)`, `forward(exit_layer=e)`, `generate(exit_layer=e)`): each exit
  is its own causal-LM object of the base's class, built once, holding the base's own layer
  modules up to e, the balcony and the shared head (`core.exits`). The base is never changed,
  so exits run side by side from any thread, and transformers' forward, masks, KV caches and
  whole generation stack work unchanged. Layers >= e never run. The full model is the base.
  (On the CPU its linear layers run packed oneDNN products, `core.kernels`: the same model to
  float rounding, about twice as fast a decode step; `set_kernels("eager")` for PyTorch's own.)
* **All exits at once** (`forward_exits`): one no-grad pass of the frozen trunk that catches the
  hidden state entering each exit, plus the mask and positions the base hands its layers; each
  balcony then runs on its exit's hidden state. The teacher (full model) comes from the same
  pass, so training never runs the trunk twice.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from ..version import __version__
from ..default import DEFAULT_EXITS, DEFAULT_NAME, is_default, is_named, named_model_path
from . import kernels
from .artifact import check_base, load_profile, load_weights, read_config, write
from .architectures import BaseParts, resolve
from .config import BalconyConfig, base_shape, fingerprint_weights
from .balconies import Balcony, new_balcony
from .card import Training, model_card, write_card
from .exits import Span, call_layer, layer_types, positions_from_mask, run_trunk, stack_model
from .errors import BalconyError, ExitError
from .generation import BalconyGenerateOutput, generate_in_mode, register_mode
from .policy import FULL, CostTable, DepthPolicy, DepthRequest

__all__ = ["FULL", "Balcony", "BalconyGenerateOutput", "BalconyModel", "ExitOutputs", "load_base", "register_mode"]


@dataclass
class ExitOutputs:
    """Result of `forward_exits`: normalised hidden states; `BalconyModel.logits` turns them into logits."""

    hidden: dict[int, torch.Tensor]  # exit -> balcony output after its norm, [batch, seq, hidden]
    teacher_hidden: torch.Tensor | None = None  # the full model's last hidden state (after final norm)
    logits: dict[int, torch.Tensor] = field(default_factory=dict)  # filled when return_logits=True
    teacher_logits: torch.Tensor | None = None
    early_exit: dict[int, torch.Tensor] = field(default_factory=dict)  # baselines (baselines=True), normalised
    truncation: dict[int, torch.Tensor] = field(default_factory=dict)


def load_base(name: str | None = None, *, dtype: torch.dtype | str | None = None, device: str | None = None):
    """Load a causal LM and its tokenizer by hub id, local path or offline name (None or "default": the
    embedded model; "gemma3-270m": Gemma 3 270M from its optional package, see `balcony.default`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(named_model_path(name)) if is_named(name) else name
    model = AutoModelForCausalLM.from_pretrained(path, dtype=_as_dtype(dtype) or torch.float32)
    if device is not None:
        model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a bare checkpoint without tokenizer files still works from token ids
    if is_named(name):
        model.config.name_or_path = name or DEFAULT_NAME  # what artifacts record, to load it by name again
    return model, tokenizer


class BalconyModel(nn.Module):
    """A frozen base causal LM plus one trainable balcony per exit."""

    def __init__(self, base: nn.Module, config: BalconyConfig, tokenizer=None):
        super().__init__()
        self.parts: BaseParts = resolve(base)  # fails clearly on unsupported architectures
        self.base = base
        self.tokenizer = tokenizer
        self.balcony_config = config
        num_layers = self.parts.num_layers
        for e in config.exits:
            if not 1 <= e < num_layers:
                raise ExitError(f"cannot place a balcony at exit {e}: exits must be in 1..{num_layers - 1} for this {num_layers}-layer base")
        config.num_layers = num_layers
        config.base_shape = config.base_shape or base_shape(base.config)
        config.balcony_version = __version__

        base.requires_grad_(False)
        base.eval()
        self.balconies = nn.ModuleDict({str(e): new_balcony(base, self.parts, e, config.sources(e), config.init)
                                        for e in config.exits})
        # the one cost model (budgets, the bench's ideal, the draft policy) and the one depth policy
        self.costs = CostTable.of(self.parts.layers[-1], self.parts.head,
                                  {None: num_layers, **{e: e + config.layers_at(e) for e in config.exits}})
        self.policy = DepthPolicy(config.exits, num_layers, self.costs)
        self._exit_models: dict[int, tuple[Balcony, nn.Module]] = {}  # built on first use, shared weights
        self._building = threading.Lock()  # threads asking for the same exit model build it once
        self.eval()  # like transformers' from_pretrained: inference mode until train() is called
        self.set_kernels("packed")  # CPU products with packed weights wherever no gradient is wanted

    # ----------------------------------------------------------------- construction

    @classmethod
    def from_base(
        cls,
        base: str | nn.Module | None = None,
        exits: list[int] | None = None,
        *,
        init: str = "copy",
        balcony_layers: int | dict = 1,
        tokenizer=None,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
    ) -> BalconyModel:
        """Attach fresh (untrained) balconies to `base`: a model, a hub id, a path, or None for the default model.

        `balcony_layers` decoder layers per balcony (the paper: 1), or {exit: layers}.
        """
        base_name = base if isinstance(base, str) or base is None else getattr(base.config, "name_or_path", None)
        if not isinstance(base, nn.Module):
            base, loaded_tokenizer = load_base(base, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        if exits is None:
            exits = default_exits(resolve(base).num_layers)
        config = BalconyConfig(exits=list(exits), init=init, base_model=DEFAULT_NAME if is_default(base_name) else base_name,
                               base_fingerprint=fingerprint_weights(base), balcony_layers=balcony_layers)
        return cls(base, config, tokenizer)

    @classmethod
    def from_pretrained(
        cls,
        artifact: str | os.PathLike,
        base: str | nn.Module | None = None,
        *,
        tokenizer=None,
        dtype: torch.dtype | str | None = None,
        device: str | None = None,
        verify_base: bool = True,
    ) -> BalconyModel:
        """Load balconies saved by `save_pretrained` onto their base (the recorded one unless `base` is given).

        `verify_base=False` skips the weight-fingerprint check (shapes are always checked), for a
        base you know is compatible, e.g. the same model re-quantized.
        """
        directory, config = read_config(artifact)
        if not isinstance(base, nn.Module):
            base, loaded_tokenizer = load_base(base if base is not None else config.base_model, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer
        check_base(config, base, directory, verify_weights=verify_base)
        model = cls(base, config, tokenizer)
        model.balconies.load_state_dict(load_weights(directory, model.balconies.state_dict(), config.weights_sha256))
        model.policy.profile = load_profile(artifact, config)
        return model

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None,
                        dtype: torch.dtype | None = None, *, training: Training | None = None, card: bool = True) -> None:
        """Write only the balconies (safetensors) and balcony_config.json; the base is never copied.

        `state_dict` overrides the balconies' own (e.g. full tensors gathered from FSDP shards);
        `dtype` (e.g. torch.bfloat16) stores floating tensors smaller; loading casts them back.
        `card`: README.md too, the model card (`core.card`), telling of `training` when given.
        """
        state = state_dict if state_dict is not None else self.balconies.state_dict()
        write(directory, state, self.balcony_config, dtype)
        if card:
            write_card(directory, model_card(self, state, training))

    def encode(self, prompt: str, *, chat: bool = False) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` for one prompt on the model's device; `chat` applies the chat template."""
        return encode_prompt(self.tokenizer, prompt, chat, self.device)

    # ----------------------------------------------------------------- properties

    @property
    def num_layers(self) -> int:
        return self.parts.num_layers

    @property
    def exits(self) -> list[int]:
        return list(self.balcony_config.exits)

    @property
    def device(self) -> torch.device:
        return self.parts.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parts.head.weight.dtype

    def set_kernels(self, kind: str) -> BalconyModel:
        """"packed" (default): the faster CPU kernels of `core.kernels`; "eager": PyTorch's and transformers' own."""
        self.kernels = kernels.check(kind)
        kernels.pack(self, kind == "packed")
        kernels.group_attention(self.base, kind == "packed")
        return self

    def train(self, mode: bool = True) -> BalconyModel:
        super().train(mode)
        self.base.eval()  # the base is frozen: never let its dropout switch on
        return self

    def _apply(self, fn, recurse=True):
        self._exit_models.clear()  # moved or cast: build exit models again on the moved modules
        super()._apply(fn, recurse)
        return self.set_kernels(self.kernels)  # packed copies of the old tensors go; the new ones pack on use

    # ----------------------------------------------------------------- one exit

    def exit_model(self, exit_layer: int | str | None) -> nn.Module:
        """The causal LM that runs exit `exit_layer`: layers[:e] + balcony e + the shared head, as an
        object of the base's own class sharing its weights (None: the base itself, the full model)."""
        exit_layer = self.policy.check_exit(exit_layer)
        if exit_layer is None:
            return self.base
        balcony = self.balconies[str(exit_layer)]
        with self._building:
            built = self._exit_models.get(exit_layer)
            if built is None or built[0] is not balcony:  # a balcony replaced after the model was built
                model = stack_model(self.base, self.parts, [*self.parts.layers[:exit_layer], *balcony.layers],
                                    balcony.norm, self._stack_types(0, exit_layer, exit_layer))
                built = self._exit_models[exit_layer] = (balcony, model)
        return built[1]

    def _stack_types(self, start: int, stop: int, balcony: int | None = None) -> list[str] | None:
        """Layer types of layers[start:stop], then of balcony `balcony`'s layers (each its source's
        kind); None for a base without layer types."""
        types = layer_types(self.base.config)
        if types is None:
            return None
        tail = [] if balcony is None else [types[i] for i in self.balcony_config.sources(balcony)]
        return types[start:stop] + tail

    def span(self, start: int, stop: int | None) -> Span:
        """layers[start:stop] then balcony(stop), or to the end of the stack and the final norm when
        `stop` is None, with its own KV cache: see `core.Span`. A new object per caller."""
        stop = self.policy.check_exit(stop) if stop is not None else None
        stop_layer = self.num_layers if stop is None else stop
        if not 0 <= start < stop_layer:
            raise ExitError(f"empty span of layers {start}..{stop_layer}")
        if stop is None:
            return Span(self.base, self.parts, start, stop_layer, [], self.parts.norm,
                        self._stack_types(start, stop_layer))
        balcony = self.balconies[str(stop)]
        return Span(self.base, self.parts, start, stop, list(balcony.layers), balcony.norm,
                    self._stack_types(start, stop, stop))

    def trunk_span(self, start: int, stop: int) -> Span:
        """layers[start:stop] alone, ending in the final norm only when `stop` is the last layer
        (otherwise its output is the raw hidden state at depth `stop`), with its own KV cache."""
        if not 0 <= start < stop <= self.num_layers:
            raise ExitError(f"empty span of layers {start}..{stop}")
        norm = self.parts.norm if stop == self.num_layers else nn.Identity()
        return Span(self.base, self.parts, start, stop, [], norm, self._stack_types(start, stop))

    def balcony_span(self, exit_layer: int) -> Span:
        """Balcony e alone: from hidden states at depth e to its norm, with its own KV cache."""
        exit_layer = self.policy.check_exit(exit_layer)
        balcony = self.balconies[str(exit_layer)]
        return Span(self.base, self.parts, exit_layer, exit_layer, list(balcony.layers), balcony.norm,
                    self._stack_types(exit_layer, exit_layer, exit_layer))

    def forward(self, input_ids=None, attention_mask=None, exit_layer: int | str | None = None, **kwargs):
        """The base's own forward at `exit_layer` (None: full model); returns its usual output (logits, cache)."""
        return self.exit_model(exit_layer)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    @torch.no_grad()
    def generate(
        self,
        *args,
        exit_layer: int | str | None = None,
        budget: float | None = None,
        max_ms_per_token: float | None = None,
        mode: str | None = None,
        **kwargs,
    ):
        """transformers `generate` at `exit_layer` (None: full model). All generation options work.

        Instead of an exit, `budget` (a fraction of the full model's per-token cost) or
        `max_ms_per_token` picks one (`core.policy`). Returns the sequences, as transformers does;
        with `return_dict_in_generate=True` a `BalconyGenerateOutput` that also says which exit
        ran (`exit_layer`) and, for a mode, its statistics (`stats`). Nothing about a call is
        kept on the model, so threads may share it.

        `mode="speculative", draft_exit=e` gives the full model's output faster, drafted by
        balcony e (`balcony.decoding.speculative`; options `num_draft`, `adaptive`,
        `draft_threshold`, `draft_vocab`, and sampling through `do_sample`/`temperature`/`top_p`).
        `mode="dynamic", threshold=t` lets each token leave at the first exit whose top
        probability exceeds t (`balcony.decoding.dynamic`; batch 1, greedy).
        """
        if mode is not None:
            if exit_layer is not None or budget is not None or max_ms_per_token is not None:
                raise ExitError(f"mode={mode!r} picks its own depth: drop exit_layer, budget and max_ms_per_token")
            return generate_in_mode(self, mode, *args, **kwargs)
        exit_layer = self.policy.resolve(DepthRequest(exit_layer, budget, max_ms_per_token))
        out = self.exit_model(exit_layer).generate(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            return out
        return BalconyGenerateOutput(**out, exit_layer=exit_layer)

    # ----------------------------------------------------------------- all exits: one trunk pass

    def forward_exits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        exits: list[int] | None = None,
        *,
        teacher: bool = True,
        return_logits: bool = False,
        checkpoint: bool = False,
        baselines: bool = False,
        position_ids: torch.Tensor | None = None,
    ) -> ExitOutputs:
        """One no-grad pass of the frozen trunk, then every requested balcony (with autograd).

        Returns normalised hidden states per exit and, with `teacher=True`, the full model's.
        Logits are left to the caller (`self.logits`) unless `return_logits=True`, because
        [batch, seq, vocab] tensors for every exit are what a memory-aware trainer avoids.
        `checkpoint=True` recomputes each balcony layer in backward instead of storing its
        activations (activation checkpointing). `baselines=True` also returns, per exit, the two
        untrained alternatives at the same depth, from the same pass: *early exit* (the base's
        final norm on the exit's hidden state) and *truncation* (layers[:e+n] for n-layer balconies,
        the same depth, then the final norm). `position_ids` with a 4-D `attention_mask` (rows
        that pack several sequences, each attending to a shared prefix) are passed to the base as is.
        """
        wanted_exits = self.exits if exits is None else [self.policy.check_exit(e) for e in exits]
        if any(e is None for e in wanted_exits):
            raise ExitError("forward_exits takes balcony exits; the full model is the teacher (teacher=True)")
        # A balcony layer gets the mask and position arguments the base hands to the first
        # layer of its own attention kind (the kind of the base layer it is a twin of).
        types = layer_types(self.base.config)
        references = {e: [types.index(types[i]) if types else 0 for i in self.balcony_config.sources(e)] for e in wanted_exits}
        wanted = {*wanted_exits, *(r for refs in references.values() for r in refs)}
        # truncation runs as many layers as the sub-model: it ends after layer e+n-1, the input of layer e+n
        depth = {e: self.costs.depths[e] for e in wanted_exits}
        if baselines:
            wanted |= {d for d in depth.values() if d < self.num_layers}
        with torch.no_grad():
            teacher_hidden, caught = run_trunk(
                self.base, self.parts, input_ids, attention_mask,
                positions_from_mask(attention_mask) if position_ids is None else position_ids,
                wanted, stop_after=None if teacher else max(wanted))

        result = ExitOutputs(hidden={}, teacher_hidden=teacher_hidden)
        for e in wanted_exits:
            hidden, balcony = caught[e][0], self.balconies[str(e)]
            calls = [caught[ref][1:] for ref in references[e]]
            result.hidden[e] = balcony.norm(_through(balcony.layers, hidden, calls, checkpoint))
            if baselines:
                with torch.no_grad():
                    result.early_exit[e] = self.parts.norm(hidden)
                    after = caught.get(depth[e])  # None: e + n >= L, truncation is the full model
                    result.truncation[e] = teacher_hidden if after is None else self.parts.norm(after[0])
        if return_logits:
            result.logits = {e: self.logits(h) for e, h in result.hidden.items()}
            if teacher_hidden is not None:
                result.teacher_logits = self.logits(teacher_hidden)
        return result

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The shared head and whatever the base applies after it (e.g. Gemma 2's soft-capping)."""
        return self.cap_logits(self.parts.head(hidden))

    def cap_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """What the base applies to the head's output (Gemma 2's soft-capping); identity for most bases."""
        return self.parts.cap_logits(logits, self.base.config)


def _through(layers, hidden: torch.Tensor, calls: list, checkpoint: bool) -> torch.Tensor:
    """Run balcony layers on `hidden`, each with the (args, kwargs) the base handed its reference
    layer; with `checkpoint` (and autograd on) recomputed in backward instead of stored."""
    for layer, (args, kwargs) in zip(layers, calls):
        if checkpoint and torch.is_grad_enabled():
            hidden = torch.utils.checkpoint.checkpoint(call_layer, layer, hidden, args, kwargs, use_reentrant=False)
        else:
            hidden = call_layer(layer, hidden, args, kwargs)
    return hidden


def encode_prompt(tokenizer, prompt: str, chat: bool, device: torch.device) -> dict[str, torch.Tensor]:
    if tokenizer is None:
        raise BalconyError("this base has no tokenizer files, so a text prompt cannot be tokenized; "
                           "save a tokenizer beside the model")
    if chat:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                return_tensors="pt", return_dict=True)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    return {k: v.to(device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}


def default_exits(num_layers: int) -> list[int]:
    """About one half, two thirds and five sixths of the depth (15, 20, 25 for 30 layers)."""
    if num_layers == 30:
        return list(DEFAULT_EXITS)
    picks = {max(1, min(num_layers - 1, round(num_layers * f))) for f in (1 / 2, 2 / 3, 5 / 6)}
    return sorted(picks)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)}")
    return names[dtype]
