"""Exit models that share the base's weights: the one module that knows transformers' internals.

An exit model is a new `*ForCausalLM` object of the base's own class whose decoder runs
`layers[:e] + balcony(e).layers`, then the balcony's norm and the shared head, under a config
of that depth. It is a *twin*: it owns its module lists and config, and holds the very same
layer, embedding and head modules as the base, so it costs no memory, never touches the base,
and any number of exits (and the base itself, the full model) can run at once, from any
thread. transformers' own forward, masks, caches and `generate` run it unchanged.

A *span* runs a slice of the stack, layers[start:stop] plus a balcony or the final norm, with
its own KV cache: speculative drafting and verifying, and dynamic exits, run spans of one
frozen stack without computing a layer twice for a token.

What this module relies on (tested on every architecture in the table and the default model):
1. the table in `architectures.py`: where the decoder, its layer list and final norm live;
2. the decoder runs the layers in its list in order, at most `config.num_hidden_layers` of
   them, and reads layer i's attention kind from `config.layer_types[i]` when there is one;
3. an attention module keeps its KV-cache slot in `layer_idx` and writes through
   `cache.update(keys, values, layer_idx, ...)`; masks read the cache's own slots in order;
4. a decoder layer takes the hidden state first (positional or `hidden_states=`) and returns
   it, alone or first in a tuple; a layer is built as `LayerClass(config, layer_idx=i)`;
5. `DynamicCache(config=...)` makes one slot per layer of the config's kinds;
6. sdpa attention (and `kernels.GROUPED_SDPA`) takes a boolean 4-D mask as given, eager attention
   an additive one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from .architectures import BaseParts
from .kernels import GROUPED_SDPA

_SDPA = ("sdpa", GROUPED_SDPA)  # attention names that run sdpa (and take its boolean masks)


def _twin(module: nn.Module) -> nn.Module:
    """A new module object of the same class sharing every parameter, buffer and child of `module`,
    with its own registries, so replacing a child of the twin leaves `module` as it was."""
    twin = copy.copy(module)
    for name, value in list(twin.__dict__.items()):
        if isinstance(value, (dict, set)):  # _modules, _parameters, _buffers, hook tables
            twin.__dict__[name] = copy.copy(value)
    return twin


def layer_types(config) -> list[str] | None:
    types = getattr(config, "layer_types", None)
    return list(types) if types is not None else None


def stack_model(base: nn.Module, parts: BaseParts, layers: list[nn.Module], norm: nn.Module,
                types: list[str] | None = None) -> nn.Module:
    """A twin of the causal LM `base` whose decoder runs `layers`, then `norm`, then the shared head.

    Its config is a copy of depth len(layers) (and `types` as its layer types), so transformers
    builds masks and KV caches for exactly these layers. Layers keep their own `layer_idx`.
    """
    config = copy.copy(base.config)
    config.num_hidden_layers = len(layers)
    if types is not None:
        config.layer_types = list(types)
    decoder = _twin(parts.decoder)
    setattr(decoder, parts.spec.layers, nn.ModuleList(layers))
    setattr(decoder, parts.spec.norm, norm)
    decoder.config = config
    model = _twin(base)
    setattr(model, parts.spec.decoder, decoder)
    model.config = config
    return model


def decoder_of(model: nn.Module, parts: BaseParts) -> nn.Module:
    return getattr(model, parts.spec.decoder)


def twin_layer(base: nn.Module, parts: BaseParts, source: int, slot: int, *, copy_weights: bool) -> nn.Module:
    """A new decoder layer of the same kind as layers[source] (full or sliding-window attention),
    owning KV-cache slot `slot`; a copy of its weights, or the base's own random init."""
    base_layer = parts.layers[source]
    layer = type(base_layer)(base.config, layer_idx=source)
    param = next(base_layer.parameters())
    layer.to(device=param.device, dtype=param.dtype)
    if copy_weights:
        layer.load_state_dict(base_layer.state_dict())
    else:
        layer.apply(base._init_weights)
    for module in layer.modules():
        if hasattr(module, "layer_idx"):
            module.layer_idx = slot
    return layer


def positions_from_mask(attention_mask: torch.Tensor | None) -> torch.Tensor | None:
    """Position ids as transformers' `generate` makes them: a padded row counts from its first real
    token, so a left-padded sequence sees the positions it would alone."""
    if attention_mask is None:
        return None
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def call_layer(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """Run a decoder layer on `hidden` with the other arguments its decoder handed another layer."""
    out = layer(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class Tapped(nn.Module):
    """A layer seen through a tap: `tap(hidden, args, kwargs)` sees every call and may return a
    hidden state to run instead. Attributes the decoder reads (e.g. `attention_type`) pass through."""

    def __init__(self, layer: nn.Module, tap: Callable):
        super().__init__()
        self.layer = layer
        self.tap = tap

    def forward(self, *args, **kwargs):
        if args:
            hidden, args = args[0], args[1:]
        else:
            hidden = kwargs.pop("hidden_states")
        replaced = self.tap(hidden, args, kwargs)
        return self.layer(hidden if replaced is None else replaced, *args, **kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "layer":
                raise
            return getattr(self.layer, name)


class StopTrunk(Exception):
    """Raised by a tap once every hidden state a caller needs is caught, to skip deeper layers."""


def run_trunk(base: nn.Module, parts: BaseParts, input_ids: torch.Tensor, attention_mask, position_ids,
              wanted: set[int], stop_after: int | None) -> tuple[torch.Tensor | None, dict[int, tuple]]:
    """One pass of the whole decoder stack; returns its normalised last hidden state (None when
    stopped early after layer index `stop_after`) and, for each index in `wanted`, the call
    (hidden, args, kwargs) that layer received: the hidden state entering it, the mask and the
    positions the base built for it."""
    caught: dict[int, tuple] = {}

    def tap_for(index: int):
        def tap(hidden, args, kwargs):
            caught[index] = (hidden, args, dict(kwargs))
            if index == stop_after:
                raise StopTrunk

        return tap

    layers = [Tapped(layer, tap_for(i)) if i in wanted else layer for i, layer in enumerate(parts.layers)]
    decoder = decoder_of(stack_model(base, parts, layers, parts.norm, layer_types(base.config)), parts)
    try:
        out = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        return out.last_hidden_state, caught
    except StopTrunk:
        return None, caught


class SpanCache(DynamicCache):
    """A KV cache for a span that starts at layer `offset`: its layers keep their slot numbers in
    the whole stack, and this cache holds slots offset.. as its own 0.."""

    def __init__(self, *args, offset: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.offset = offset

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        return super().update(key_states, value_states, layer_idx - self.offset, *args, **kwargs)


class Span:
    """layers[start:stop] of the stack, then `tail` (a balcony's layers) and `norm`, as a decoder.

    `span(ids, cache=...)` returns the normalised hidden states. A span that starts inside the
    stack (start > 0) takes `states=` (hidden states at depth `start`) instead of embeddings; a
    span that ends in a balcony leaves the hidden states entering it (depth `stop`, the next
    span's input) in `exit_states`. Each span object has its own state: build one per decoder.
    """

    def __init__(self, base: nn.Module, parts: BaseParts, start: int, stop: int, tail: list[nn.Module],
                 norm: nn.Module, types: list[str] | None):
        self.start, self.parts = start, parts
        self.states: torch.Tensor | None = None
        self.exit_states: torch.Tensor | None = None
        layers = list(parts.layers[start:stop]) + list(tail)
        if start > 0:
            layers[0] = Tapped(layers[0], lambda hidden, args, kwargs: self.states)
        if tail and stop > start:  # a balcony-only span's input is its exit state already
            def keep(hidden, args, kwargs):
                self.exit_states = hidden

            layers[stop - start] = Tapped(layers[stop - start], keep)
        self.model = stack_model(base, parts, layers, norm, types)
        self.decoder = decoder_of(self.model, parts)

    def new_cache(self) -> SpanCache:
        cache = SpanCache(config=self.model.config, offset=self.start)
        if hasattr(cache, "activate_past_recording"):
            cache.activate_past_recording()  # sliding-window layers must be able to roll back
        return cache

    def __call__(self, input_ids: torch.Tensor | None = None, *, states: torch.Tensor | None = None,
                 cache: SpanCache, attention_mask=None, position_ids=None) -> torch.Tensor:
        if (states is None) != (self.start == 0):
            raise ValueError("a span from the embeddings takes input_ids; one from inside the stack takes states")
        if states is not None:
            self.states = states
            input_ids = torch.zeros(states.shape[:2], dtype=torch.long, device=states.device)  # replaced
        return self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=True).last_hidden_state


def has_sliding_window(config) -> bool:
    return bool(getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)) or any(
        t != "full_attention" for t in getattr(config, "layer_types", None) or [])


def can_join_rows(config) -> bool:
    """Whether KV caches of sequences started apart can be joined into one left-padded batch: not
    where sliding-window layers keep a rolling window with their own count of tokens seen."""
    return not has_sliding_window(config)


def join_rows(cache: DynamicCache | None, other: DynamicCache) -> DynamicCache:
    """`other`'s rows appended to `cache`'s (caches of the same layers), the shorter one left-padded
    with empty columns, which the caller masks out. Returns the joined cache (`other` if `cache` is None)."""
    if cache is None:
        return other
    for mine, theirs in zip(cache.layers, other.layers):
        width = max(mine.keys.shape[-2], theirs.keys.shape[-2])
        mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)], 0)
        mine.values = torch.cat([_pad_left(mine.values, width), _pad_left(theirs.values, width)], 0)
    return cache


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of any lengths as one left-padded batch: token ids and the padding mask."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask


def pad_columns(cache: DynamicCache, width: int) -> None:
    """Left-pad every layer to `width` columns (empty ones, to be masked)."""
    for layer in cache.layers:
        layer.keys, layer.values = _pad_left(layer.keys, width), _pad_left(layer.values, width)


def drop_columns(cache: DynamicCache, count: int) -> None:
    """Drop the first `count` columns of every layer (columns no row attends to any more). The rest is
    viewed, not copied: the serving runner's layers copy a cache into new stores at its next step
    anyway (`serving.kvcache`), and a compiled step is only ever handed such stores."""
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[..., count:, :], layer.values[..., count:, :]


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    missing = width - tensor.shape[-2]
    if missing <= 0:
        return tensor
    pad = tensor.new_zeros(*tensor.shape[:-2], missing, tensor.shape[-1])
    return torch.cat([pad, tensor], -2)


def takes_block_mask(config) -> bool:
    """Whether the base can take a 4-D [batch, 1, query, key] mask of our own (rows that pack several
    sequences): attention that reads one (sdpa, eager), and no sliding window to build into it."""
    kind = getattr(config, "_attn_implementation", None)
    return not has_sliding_window(config) and kind in (*_SDPA, "eager")


def block_mask(allowed: torch.Tensor, config, dtype: torch.dtype) -> torch.Tensor:
    """A boolean [batch, 1, query, key] mask (True: may attend) in the form the base's attention takes."""
    if config._attn_implementation in _SDPA:
        return allowed
    # eager attention adds the mask to its scores
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)


def has_sliding_layers(cache: DynamicCache) -> bool:
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", []))
