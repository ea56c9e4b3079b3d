"""BalconyModel: a frozen causal LM with small trainable exit layers ("balconies").

Exit e means "the hidden state after the first e decoder layers". Balcony(e) is one extra
decoder layer of the base's own class (n of them if configured), its own copy of the base's
final norm, and the base's shared (frozen) LM head. The sub-model at exit e runs
layers[:e] + balcony(e) + head.

Two ways through the model, both reusing the base's own transformers code:

* **Exit view** (`forward(exit_layer=e)`, `generate(exit_layer=e)`): for the duration of a
  call the base's layer list becomes `layers[:e] + balcony(e).layers` and its final norm
  becomes `balcony(e).norm`. The base's own forward then builds embeddings, positions, masks,
  KV caches and soft-capping exactly as it always does, and the whole transformers generation
  stack (greedy, sampling, streamers, stopping criteria) works unchanged. Layers >= e never
  run.
* **All exits at once** (`forward_exits`): one no-grad pass of the frozen trunk. Hooks catch
  the hidden state entering each exit layer, plus the mask/position arguments the base hands
  its layers; each balcony then runs on its exit's hidden state. The teacher (full model)
  comes from the same pass, so training never runs the trunk twice.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.utils.checkpoint
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .architectures import BaseParts, resolve
from .config import CONFIG_NAME, WEIGHTS_NAME, BalconyConfig, base_shape, fingerprint_weights
from .default import DEFAULT_EXITS, DEFAULT_NAME, artifact_path, cache_root, default_model_path, is_default
from .errors import ArtifactError, BalconyError, BaseMismatchError, ExitError

FULL = "full"
_LEGACY_KEY = re.compile(r"^(\d+)\.layer\.")
PROFILE_NAME = "bench_profile.json"  # written by `balcony bench` beside an artifact


class Balcony(nn.Module):
    """One exit: decoder layers of the base's kind (one, as in the paper, unless configured) and a
    norm of the final-norm kind."""

    def __init__(self, layers: list[nn.Module], norm: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class _StopTrunk(Exception):
    """Raised from a hook once every needed hidden state is caught, to skip deeper layers."""


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
    """Load a causal LM and its tokenizer by hub id or local path; None or "default" is the embedded model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = str(default_model_path()) if is_default(name) else name
    dtype = _as_dtype(dtype) or torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if device is not None:
        model.to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError):
        tokenizer = None  # a bare checkpoint without tokenizer files still works from token ids
    if is_default(name):
        model.config.name_or_path = DEFAULT_NAME
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
        self.balconies = nn.ModuleDict({str(e): self._new_balcony(e, config.init) for e in config.exits})
        self._lock = threading.RLock()  # the exit view swaps modules on the base: one call at a time
        self._own_config = base.config  # views swap the config; its own layer types are read from here
        self.profile: dict | None = None  # measured speed per exit (balcony bench), for max_ms_per_token
        self.last_exit: int | None = None  # the exit the last generate() ran at (None: full model)
        self.last_stats: dict | None = None  # statistics of the last speculative or dynamic generate()
        self.eval()  # like transformers' from_pretrained: inference mode until train() is called

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
        config = BalconyConfig(
            exits=list(exits),
            init=init,
            base_model=DEFAULT_NAME if is_default(base_name) else base_name,
            base_fingerprint=fingerprint_weights(base),
            balcony_layers=balcony_layers,
        )
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
        directory = artifact_path(artifact)
        config = BalconyConfig.load(directory)
        weights_path = directory / WEIGHTS_NAME
        if not weights_path.is_file():
            raise ArtifactError(f"{weights_path} not found: the artifact is incomplete; save it again with save_pretrained")
        if not isinstance(base, nn.Module):
            base, loaded_tokenizer = load_base(base if base is not None else config.base_model, dtype=dtype, device=device)
            tokenizer = tokenizer or loaded_tokenizer

        _check_shape(config, base)
        if verify_base and config.base_fingerprint:
            found = fingerprint_weights(base)
            if found != config.base_fingerprint:
                raise BaseMismatchError(
                    f"the balconies in {directory} were trained on a base with weight fingerprint "
                    f"{config.base_fingerprint} ({config.base_model}), but the given base has {found}: its weights differ. "
                    "Load the recorded base, or pass verify_base=False (CLI: --no-verify-base) if you know it is compatible."
                )
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as err:
            raise ArtifactError(f"{weights_path} is corrupt or truncated ({err}); save or download the artifact again") from err

        model = cls(base, config, tokenizer)
        # artifacts from before multi-layer balconies named the one layer "E.layer.*"
        state = {_LEGACY_KEY.sub(r"\1.layers.0.", k): v for k, v in state.items()}
        expected = model.balconies.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ArtifactError(
                f"{weights_path} does not match {CONFIG_NAME}: missing {missing[:5]}, unexpected {unexpected[:5]}; "
                "the artifact is corrupt or was edited"
            )
        for key, tensor in state.items():
            if tensor.shape != expected[key].shape:
                raise BaseMismatchError(
                    f"{weights_path}: tensor {key} has shape {tuple(tensor.shape)}, the base needs {tuple(expected[key].shape)}"
                )
        model.balconies.load_state_dict(state)
        profile_path = speed_profile_path(artifact, for_writing=False)
        if profile_path.is_file():
            try:
                model.profile = json.loads(profile_path.read_text())
            except json.JSONDecodeError:
                model.profile = None  # a damaged profile only costs max_ms_per_token; budgets still work
        return model

    def balcony_sources(self, exit_layer: int) -> list[int]:
        """The base layer each layer of balcony(exit_layer) is a twin of (its kind and its copy init).

        The last is the base's *last* layer (the paper's choice: the layer a balcony replaces, the
        final step before the norm and head); layers before it continue the trunk (layers e,
        e+1, ...), so a deeper balcony starts as "a few more base layers, then the last one".
        """
        last = self.parts.num_layers - 1
        n = self.balcony_config.layers_at(exit_layer)
        return [min(exit_layer + i, last) for i in range(n - 1)] + [last]

    def _new_balcony(self, exit_layer: int, init: str) -> Balcony:
        layers = []
        norm = copy.deepcopy(self.parts.norm)
        for i, source in enumerate(self.balcony_sources(exit_layer)):
            base_layer = self.parts.layers[source]
            # a twin of the same kind (full vs sliding-window attention) as its source layer
            layer = type(base_layer)(self.base.config, layer_idx=source)
            param = next(base_layer.parameters())
            layer.to(device=param.device, dtype=param.dtype)
            if init == "copy":
                layer.load_state_dict(base_layer.state_dict())
            else:
                layer.apply(self.base._init_weights)
            _set_cache_slot(layer, exit_layer + i)
            layers.append(layer)
        if init != "copy":
            norm.apply(self.base._init_weights)
        balcony = Balcony(layers, norm)
        balcony.requires_grad_(True)
        return balcony

    def encode(self, prompt: str, *, chat: bool = False) -> dict[str, torch.Tensor]:
        """`input_ids` and `attention_mask` for one prompt on the model's device; `chat` applies the chat template."""
        if self.tokenizer is None:
            raise BalconyError("this base has no tokenizer files, so a text prompt cannot be tokenized; "
                            "save a tokenizer beside the model")
        if chat:
            encoded = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                         return_tensors="pt", return_dict=True)
        else:
            encoded = self.tokenizer(prompt, return_tensors="pt")
        return {k: v.to(self.device) for k, v in encoded.items() if k in ("input_ids", "attention_mask")}

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

    def train(self, mode: bool = True) -> BalconyModel:
        super().train(mode)
        self.base.eval()  # the base is frozen: never let its dropout switch on
        return self

    def check_exit(self, exit_layer: int | str | None) -> int | None:
        """Normalise an exit: None for the full model, else an exit that has a balcony."""
        if exit_layer is None or exit_layer == FULL:
            return None
        if isinstance(exit_layer, str):
            if not exit_layer.strip().lstrip("-").isdigit():
                raise ExitError(f"exit {exit_layer!r} is not a layer number: use an integer in {self._exit_help()}")
            exit_layer = int(exit_layer)
        if isinstance(exit_layer, bool) or not isinstance(exit_layer, int):
            raise ExitError(f"exit {exit_layer!r} is not a layer number: use an integer in {self._exit_help()}")
        if exit_layer == self.num_layers:
            return None
        if not 1 <= exit_layer < self.num_layers:
            raise ExitError(f"exit {exit_layer} is out of range: {self._exit_help()}")
        if exit_layer not in self.balcony_config.exits:
            raise ExitError(
                f"exit {exit_layer} has no balcony: {self._exit_help()}. Train balconies that include exit {exit_layer} to use it."
            )
        return exit_layer

    def _exit_help(self) -> str:
        return (
            f"balconies are at exits {self.exits}; use {self.num_layers}, None or 'full' for the full "
            f"{self.num_layers}-layer model"
        )

    # ----------------------------------------------------------------- one exit: the exit view

    @contextmanager
    def exit_view(self, exit_layer: int | str | None):
        """Within this block the base *is* the sub-model at `exit_layer` (None: the full model)."""
        exit_layer = self.check_exit(exit_layer)
        if exit_layer is None:
            with self._lock:
                if getattr(self.parts.decoder, self.parts.spec.layers) is self.parts.layers:
                    yield self.base
                    return
            # inside another view: the full stack again, for the length of this one
            layer_types = getattr(self._own_config, "layer_types", None)
            with self.layer_view(list(self.parts.layers), norm=self.parts.norm, layer_types=layer_types) as base:
                yield base
            return
        with self.span_view(0, exit_layer) as sub_model:  # layers[:e] + balcony e, from the embeddings
            yield sub_model

    @contextmanager
    def layer_view(self, layers: list[nn.Module], *, norm: nn.Module | None = None, layer_types: list[str] | None = None):
        """Within this block the base runs `layers` (and `norm`, default its own) instead of its own stack.

        The config is swapped for a shallow copy whose depth and layer types match, so
        transformers builds masks and KV caches for exactly these layers. The layers keep
        their own `layer_idx` (their KV-cache slot); callers that reorder layers set it.
        """
        spec, decoder, base = self.parts.spec, self.parts.decoder, self.base
        view_config = copy.copy(base.config)
        view_config.num_hidden_layers = len(layers)
        if layer_types is not None:
            view_config.layer_types = list(layer_types)
        with self._lock:
            # restore what was there, not the base's own parts: a view opened inside another (same
            # thread) must hand the outer view back its layers, or the outer one would silently run
            # the truncated stack instead of its balcony
            saved = (base.config, decoder.config, getattr(decoder, spec.layers), getattr(decoder, spec.norm))
            setattr(decoder, spec.layers, nn.ModuleList(layers))
            setattr(decoder, spec.norm, norm if norm is not None else self.parts.norm)
            base.config = decoder.config = view_config
            try:
                yield base
            finally:
                base.config, decoder.config = saved[:2]
                setattr(decoder, spec.layers, saved[2])
                setattr(decoder, spec.norm, saved[3])

    @contextmanager
    def span_view(self, start: int, stop: int | None, feed: dict | None = None):
        """The base as layers[start:stop] followed by balcony(stop), or by the final norm when `stop` is None.

        For a span that starts inside the stack (`start > 0`) the embeddings the base computes
        are discarded: a pre-hook on the span's first layer hands it `feed["states"]` (hidden
        states at depth `start`) instead. For a span that ends in a balcony, `feed["exit_states"]`
        receives the hidden states entering it (depth `stop`: the next span's input). The span's layers own KV-cache slots 0..n-1, so each
        span keeps its own cache; drafting, verifying and dynamic exits run spans of the same
        frozen stack without computing any layer twice for a token.
        """
        stop_layer = self.num_layers if stop is None else stop
        if not 0 <= start < stop_layer:
            raise ExitError(f"empty span of layers {start}..{stop_layer}")
        layers = list(self.parts.layers[start:stop_layer])
        layer_types = getattr(self._own_config, "layer_types", None)
        types = None if layer_types is None else list(layer_types[start:stop_layer])
        norm, balcony = None, None
        if stop is not None:
            balcony = self.balconies[str(self.check_exit(stop))]
            layers.extend(balcony.layers)
            norm = balcony.norm
            if types is not None:
                types.extend(layer_types[i] for i in self.balcony_sources(stop))

        def inject(module, args, kwargs):
            states = feed["states"]
            if args:
                return (states, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": states}

        def catch(module, args, kwargs):
            feed["exit_states"] = args[0] if args else kwargs["hidden_states"]

        handles = []
        if start > 0:
            handles.append(layers[0].register_forward_pre_hook(inject, with_kwargs=True))
        if balcony is not None and feed is not None:
            handles.append(balcony.layers[0].register_forward_pre_hook(catch, with_kwargs=True))
        for slot, layer in enumerate(layers):
            _set_cache_slot(layer, slot)
        try:
            with self.layer_view(layers, norm=norm, layer_types=types) as base:
                yield base
        finally:
            for handle in handles:
                handle.remove()
            for slot, layer in enumerate(self.parts.layers):
                _set_cache_slot(layer, slot)
            if balcony is not None:
                for i, layer in enumerate(balcony.layers):
                    _set_cache_slot(layer, stop + i)

    def forward(self, input_ids=None, attention_mask=None, exit_layer: int | str | None = None, **kwargs):
        """The base's own forward at `exit_layer` (None: full model); returns its usual output (logits, cache)."""
        with self.exit_view(exit_layer) as sub_model:
            return sub_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

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
        `max_ms_per_token` picks one (see `choose_exit`); the exit used is left in `last_exit`.

        `mode="speculative", draft_exit=e` gives the full model's output faster, drafted by
        balcony e (`balcony.speculative`; options `num_draft`, `adaptive`, `draft_threshold`,
        `draft_vocab`, and sampling through `do_sample`/`temperature`/`top_p`).
        `mode="dynamic", threshold=t` lets each token leave at the first exit whose top
        probability exceeds t (`balcony.dynamic`; batch 1, greedy). Statistics of the last
        call are left in `last_stats`.
        """
        if mode is not None:
            return self._generate_mode(mode, *args, exit_layer=exit_layer, budget=budget,
                                       max_ms_per_token=max_ms_per_token, **kwargs)
        if budget is not None or max_ms_per_token is not None:
            if exit_layer is not None:
                raise ExitError("give exit_layer, budget or max_ms_per_token, not several")
            exit_layer = self.choose_exit(budget=budget, max_ms_per_token=max_ms_per_token)
        with self.exit_view(exit_layer) as sub_model:
            self.last_exit = self.check_exit(exit_layer)
            return sub_model.generate(*args, **kwargs)

    _MODE_OPTIONS = {
        "speculative": {"draft_exit", "num_draft", "adaptive", "draft_threshold", "draft_vocab", "do_sample",
                        "temperature", "top_p", "generator", "attention_mask"},
        "dynamic": {"threshold", "exits", "draft_vocab", "attention_mask", "do_sample"},
    }

    def _generate_mode(self, mode: str, input_ids=None, *, exit_layer=None, budget=None, max_ms_per_token=None,
                       max_new_tokens: int | None = None, eos_token_id=None, pad_token_id=None, **options):
        from .dynamic import dynamic_generate
        from .speculative import speculative_generate

        if mode not in self._MODE_OPTIONS:
            raise ExitError(f"unknown generation mode {mode!r}: use 'speculative' or 'dynamic' (or no mode)")
        if exit_layer is not None or budget is not None or max_ms_per_token is not None:
            raise ExitError(f"mode={mode!r} picks its own depth: drop exit_layer, budget and max_ms_per_token")
        input_ids = options.pop("inputs", input_ids) if input_ids is None else input_ids
        unknown = set(options) - self._MODE_OPTIONS[mode]
        if unknown:
            raise ExitError(f"mode={mode!r} does not take {sorted(unknown)}; it takes {sorted(self._MODE_OPTIONS[mode])}")
        config = self.base.generation_config
        max_new_tokens = max_new_tokens or config.max_new_tokens or 20
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        pad = config.pad_token_id if pad_token_id is None else pad_token_id
        if mode == "speculative":
            if options.get("draft_exit") is None:
                raise ExitError(f"mode='speculative' needs draft_exit=, one of {self.exits}")
            out, stats = speculative_generate(self, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                              pad_token_id=pad, **options)
        else:
            if options.pop("do_sample", False):
                raise ExitError("mode='dynamic' decodes greedily: drop do_sample")
            mask = options.pop("attention_mask", None)
            if mask is not None and not bool(mask.all()):
                raise ExitError("mode='dynamic' decodes one unpadded sequence: pass a batch of 1 without padding")
            if options.get("threshold") is None:
                raise ExitError("mode='dynamic' needs threshold= (a top probability in [0, 1]; 1.0: the full model)")
            out, stats = dynamic_generate(self, input_ids, max_new_tokens=max_new_tokens, eos_token_id=eos, **options)
        self.last_exit, self.last_stats = None, {"mode": mode, **stats}
        return out

    def choose_exit(self, budget: float | None = None, max_ms_per_token: float | None = None) -> int | None:
        """The deepest exit that fits: None (the full model) when it fits itself.

        `budget` is compared with the FLOP model (`relative_cost`); `max_ms_per_token` with
        the measured profile that `balcony bench` stores beside the artifact (batch 1 decode).
        When even the shallowest exit does not fit, the shallowest exit is used.
        """
        if (budget is None) == (max_ms_per_token is None):
            raise ExitError("choose_exit takes exactly one of budget or max_ms_per_token")
        candidates = [*self.exits, None]
        if budget is not None:
            if not budget > 0:
                raise ExitError(f"budget must be a fraction of the full model's cost in (0, 1], not {budget}")
            cost = {e: self.relative_cost(e) for e in candidates}
            limit = budget
        else:
            if not max_ms_per_token > 0:
                raise ExitError(f"max_ms_per_token must be positive, not {max_ms_per_token}")
            if not self.profile:
                raise ExitError(
                    "max_ms_per_token needs a measured speed profile: run `balcony bench ARTIFACT` once "
                    "(it stores bench_profile.json beside the artifact), or pass budget= instead"
                )
            measured = self.profile["ms_per_token"]
            cost = {e: measured.get("full" if e is None else str(e)) for e in candidates}
            missing = [e for e, v in cost.items() if v is None]
            if missing:
                raise ExitError(f"the speed profile has no figure for exits {missing}: run `balcony bench` again")
            limit = max_ms_per_token
        fitting = [e for e in candidates if cost[e] <= limit * (1 + 1e-9)]
        return fitting[-1] if fitting else self.exits[0]

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
        exits = self.exits if exits is None else [self.check_exit(e) for e in exits]
        if any(e is None for e in exits):
            raise ExitError("forward_exits takes balcony exits; the full model is the teacher (teacher=True)")
        layers = self.parts.layers
        # A balcony layer gets the mask and position arguments the base hands to the first
        # layer of its own attention kind (the kind of the base layer it is a twin of).
        layer_types = getattr(self._own_config, "layer_types", None)
        references = {e: [layer_types.index(layer_types[i]) if layer_types else 0 for i in self.balcony_sources(e)]
                      for e in exits}
        wanted = {*exits, *(r for refs in references.values() for r in refs)}
        # truncation runs as many layers as the sub-model: it ends after layer e+n-1, the input of layer e+n
        depth = {e: e + self.balcony_config.layers_at(e) for e in exits}
        if baselines:
            wanted |= {d for d in depth.values() if d < self.num_layers}
        stop_after = None if teacher else max(wanted)
        caught: dict[int, tuple[tuple, dict]] = {}

        def catcher(index: int):
            def hook(module, args, kwargs):
                caught[index] = (args, kwargs)
                if index == stop_after:
                    raise _StopTrunk

            return hook

        handles = [layers[i].register_forward_pre_hook(catcher(i), with_kwargs=True) for i in wanted]
        teacher_hidden = None
        try:
            with self.exit_view(None), torch.no_grad():  # the whole stack, even inside another view
                out = self.parts.decoder(input_ids=input_ids, attention_mask=attention_mask,
                                         position_ids=_positions(attention_mask) if position_ids is None else position_ids,
                                         use_cache=False)
                teacher_hidden = out.last_hidden_state
        except _StopTrunk:
            pass
        finally:
            for handle in handles:
                handle.remove()

        result = ExitOutputs(hidden={}, teacher_hidden=teacher_hidden)
        for e in exits:
            args, kwargs = caught[e]
            hidden = args[0] if args else kwargs["hidden_states"]
            balcony = self.balconies[str(e)]
            out = hidden
            for layer, ref in zip(balcony.layers, references[e]):
                ref_args, ref_kwargs = caught[ref]
                if checkpoint and torch.is_grad_enabled():
                    out = torch.utils.checkpoint.checkpoint(_run_layer, layer, out, ref_args, ref_kwargs,
                                                            use_reentrant=False)
                else:
                    out = _run_layer(layer, out, ref_args, ref_kwargs)
            result.hidden[e] = balcony.norm(out)
            if baselines:
                with torch.no_grad():
                    result.early_exit[e] = self.parts.norm(hidden)
                    after = caught.get(depth[e])
                    if after is None:  # e + n >= L: truncation is the full model
                        result.truncation[e] = teacher_hidden
                    else:
                        result.truncation[e] = self.parts.norm(after[0][0] if after[0] else after[1]["hidden_states"])
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
        if self.parts.spec.logit_softcap:
            cap = getattr(self.base.config, self.parts.spec.logit_softcap, None)
            if cap:
                logits = torch.tanh(logits / cap) * cap
        return logits

    # ----------------------------------------------------------------- sizes and cost

    def balcony_parameters(self, exit_layer: int) -> int:
        return sum(p.numel() for p in self.balconies[str(self.check_exit(exit_layer))].parameters())

    def flops_per_token(self, exit_layer: int | str | None = None) -> int:
        """Matmul FLOPs per token (2 x weights touched): layers run plus the head.

        Attention over the context adds a length-dependent term left out here; at the short
        and medium contexts this is used for, the weights dominate.
        """
        exit_layer = self.check_exit(exit_layer)
        depth = self.num_layers if exit_layer is None else exit_layer + self.balcony_config.layers_at(exit_layer)
        return self.flops_at_depth(depth)

    def flops_at_depth(self, depth: int) -> int:
        """Matmul FLOPs per token of `depth` decoder layers and the head (the same model as above)."""
        layer = sum(p.numel() for p in self.parts.layers[-1].parameters())
        return 2 * (depth * layer + self.parts.head.weight.numel())

    def relative_cost(self, exit_layer: int | str | None) -> float:
        """Per-token cost of `exit_layer` as a fraction of the full model's."""
        return self.flops_per_token(exit_layer) / self.flops_per_token(None)

    # ----------------------------------------------------------------- artifact

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict | None = None,
                        dtype: torch.dtype | None = None) -> None:
        """Write only the balconies (safetensors) and balcony_config.json; the base is never copied.

        `state_dict` overrides the balconies' own (e.g. full tensors gathered from FSDP shards);
        `dtype` (e.g. torch.bfloat16) stores floating tensors smaller; loading casts them back.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = state_dict if state_dict is not None else self.balconies.state_dict()
        state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
        if dtype is not None:
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt", "balcony_version": __version__})
        self.balcony_config.save(directory)
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


def default_exits(num_layers: int) -> list[int]:
    """About one half, two thirds and five sixths of the depth (15, 20, 25 for 30 layers)."""
    if num_layers == 30:
        return list(DEFAULT_EXITS)
    picks = {max(1, min(num_layers - 1, round(num_layers * f))) for f in (1 / 2, 2 / 3, 5 / 6)}
    return sorted(picks)


def _check_shape(config: BalconyConfig, base: nn.Module) -> None:
    found = base_shape(base.config)
    diffs = {k: (v, found.get(k)) for k, v in config.base_shape.items() if found.get(k) != v}
    if diffs:
        detail = ", ".join(f"{k}: artifact {a!r} vs base {b!r}" for k, (a, b) in diffs.items())
        raise BaseMismatchError(
            f"these balconies were made for a different base ({config.base_model}): {detail}. Load them onto the recorded base."
        )


def _positions(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    # As transformers' generate does: padded rows count positions from their first real token,
    # so a left-padded sequence sees the same positions as it does alone.
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities after temperature and nucleus (top-p) filtering: what a sampler draws from.

    Nucleus: keep the smallest set of most likely tokens holding `top_p` of the mass.
    """
    logits = logits.float() / temperature
    if top_p < 1.0:
        ordered, order = logits.sort(-1, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        drop = cumulative - ordered.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        ordered = ordered.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return logits.softmax(-1)


def _run_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Call a decoder layer the way the base called its reference layer, on another hidden state."""
    out = layer(hidden, *args[1:], **kwargs) if args else layer(**{**kwargs, "hidden_states": hidden})
    return out[0] if isinstance(out, tuple) else out


_SLOT_OWNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _set_cache_slot(layer: nn.Module, slot: int) -> None:
    # Attention modules index the KV cache by `layer_idx`; in the exit view a balcony sits at
    # position e of the layer list, so it owns cache slot e. Views are entered once per decode
    # step, so the modules that hold `layer_idx` are looked up once per layer, not every time.
    owners = _SLOT_OWNERS.get(layer)
    if owners is None:
        owners = _SLOT_OWNERS[layer] = [m for m in layer.modules() if hasattr(m, "layer_idx")]
    for module in owners:
        module.layer_idx = slot


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(names)}")
    return names[dtype]
