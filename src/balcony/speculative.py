"""Self-speculative decoding with a balcony as the draft (first step: batch 1, greedy).

The frozen base pays off here: the draft (layers[:e] + balcony e) and the full model share
layers[:e] exactly, so the shallow layers run once per token. Per round:

1. draft up to k tokens with the sub-model at exit e (its own KV cache: e shallow slots and
   the balcony's slot), keeping the hidden state each token had after layers[:e];
2. verify them all in one pass of layers[e:] started from those hidden states (a second KV
   cache holding only the deep layers), giving the full model's choice at every position;
3. keep the longest prefix where draft and full model agree plus the full model's own next
   token, and crop both caches back past the rejected tokens.

Greedy output is the full model's exactly. Both passes are the base's own transformers
forward: the draft is the exit view; the verifier is a view whose layer list is layers[e:],
with a pre-hook on its first layer that swaps the (discarded) embedding for the caught
hidden states.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import DynamicCache

from .errors import ExitError
from .model import BalconyModel, _set_cache_slot


def _new_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()  # sliding-window layers must be able to roll back
    return cache


@contextmanager
def _deep_view(model: BalconyModel, exit_layer: int, hidden: dict):
    """The base as layers[exit_layer:] + final norm + head, fed `hidden["states"]` instead of embeddings."""
    layers = model.parts.layers
    deep = list(layers[exit_layer:])
    layer_types = getattr(model.base.config, "layer_types", None)

    def inject(module, args, kwargs):
        states = hidden["states"]
        if args:
            return (states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": states}

    handle = deep[0].register_forward_pre_hook(inject, with_kwargs=True)
    for slot, layer in enumerate(deep):  # the deep cache holds only these layers
        _set_cache_slot(layer, slot)
    try:
        with model.layer_view(deep, layer_types=None if layer_types is None else layer_types[exit_layer:]) as base:
            yield base, base.config
    finally:
        handle.remove()
        for slot, layer in enumerate(layers):
            _set_cache_slot(layer, slot)


@torch.no_grad()
def speculative_generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    *,
    draft_exit: int,
    max_new_tokens: int,
    num_draft: int = 4,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Greedy decoding whose output is the full model's, drafted at `draft_exit`. Batch 1.

    Returns the sequence (prompt + new tokens) and statistics: rounds, drafted and accepted
    tokens, mean accepted length.
    """
    draft_exit = model.check_exit(draft_exit)
    if draft_exit is None:
        raise ExitError("the draft must be a balcony exit, not the full model")
    if input_ids.shape[0] != 1:
        raise NotImplementedError("speculative decoding handles batch size 1 so far")
    if max_new_tokens < 1 or num_draft < 1:
        raise ValueError("max_new_tokens and num_draft must be at least 1")
    balcony_layer = model.balconies[str(draft_exit)].layer
    caught: dict = {}

    def catch(module, args, kwargs):
        caught["states"] = args[0] if args else kwargs["hidden_states"]

    handle = balcony_layer.register_forward_pre_hook(catch, with_kwargs=True)
    stats = {"rounds": 0, "drafted": 0, "accepted": 0}
    try:
        with model._lock:
            with model.exit_view(draft_exit) as draft_model:
                draft_cache = _new_cache(draft_model.config)
            with _deep_view(model, draft_exit, caught) as (_, deep_config):
                deep_cache = _new_cache(deep_config)

            def draft_step(ids):
                with model.exit_view(draft_exit) as draft_model:
                    logits = draft_model(input_ids=ids, cache=draft_cache, use_cache=True).logits
                return logits[:, -1].argmax(-1), caught["states"]

            def verify(ids, states):
                caught["states"] = states
                with _deep_view(model, draft_exit, caught) as (deep_model, _):
                    return deep_model(input_ids=ids, cache=deep_cache, use_cache=True).logits.argmax(-1)

            # prefill: the prompt through the draft (shallow + balcony caches), then the deep layers
            _, states = draft_step(input_ids)
            first = verify(input_ids, states)[:, -1]
            out = [int(first)]
            pending = first.view(1, 1)  # emitted, but not yet in any cache
            while len(out) < max_new_tokens and (eos_token_id is None or out[-1] != eos_token_id):
                budget = min(num_draft, max_new_tokens - len(out))
                drafts, all_states, ids = [], [], pending
                for _ in range(budget):
                    token, states = draft_step(ids)
                    all_states.append(states)
                    drafts.append(int(token))
                    ids = token.view(1, 1)
                # verify [pending, d1 .. d_{k-1}]: the full model's choice after each of them
                verify_ids = torch.cat([pending, torch.tensor([drafts[:-1]], dtype=pending.dtype, device=pending.device)], 1)
                choice = verify(verify_ids, torch.cat(all_states, 1))[0].tolist()
                accepted = 0
                while accepted < budget and drafts[accepted] == choice[accepted]:
                    accepted += 1
                stats["rounds"] += 1
                stats["drafted"] += budget
                stats["accepted"] += accepted
                if accepted == budget:  # all agreed: the last draft is emitted, its KV comes next round
                    new = drafts
                    pending = torch.tensor([[drafts[-1]]], dtype=pending.dtype, device=pending.device)
                    # the caches hold pending + d1..d_{k-1}: all accepted, nothing to crop
                else:
                    new = drafts[:accepted] + [choice[accepted]]
                    # caches hold pending + d1..d_{k-1} (k entries); keep pending + d1..d_accepted
                    drop = budget - 1 - accepted
                    if drop:
                        draft_cache.crop(-drop)
                        deep_cache.crop(-drop)
                    pending = torch.tensor([[choice[accepted]]], dtype=pending.dtype, device=pending.device)
                if eos_token_id is not None and eos_token_id in new:
                    new = new[: new.index(eos_token_id) + 1]
                out.extend(new)
    finally:
        handle.remove()
    out = out[:max_new_tokens]
    stats["mean_accepted"] = stats["accepted"] / max(stats["rounds"], 1)
    stats["acceptance_rate"] = stats["accepted"] / max(stats["drafted"], 1)
    sequence = torch.cat([input_ids, torch.tensor([out], dtype=input_ids.dtype, device=input_ids.device)], 1)
    return sequence, stats
