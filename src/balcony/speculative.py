"""Self-speculative decoding with a balcony as the draft: the full model's output, batched.

The frozen base pays off here: the draft (layers[:e] + balcony e) and the full model share
layers[:e] exactly, so the shallow layers run once per token. Per round, for every sequence
of the batch at once:

1. draft up to k tokens with the sub-model at exit e (its own KV cache: e shallow slots and
   the balcony's slot), keeping the hidden state each token had after layers[:e];
2. verify them all in one pass of layers[e:] started from those hidden states (a second KV
   cache holding only the deep layers), giving the full model's distribution at every position;
3. keep the longest prefix the full model accepts plus its own next token (greedy: equal
   argmax; sampling: the standard speculative-sampling rule, accept with min(1, p/q), else
   draw from max(0, p - q)), and drop the KV entries of rejected tokens.

Sequences of a batch accept different numbers of tokens. Each row keeps its own positions
(`position_ids`), and the KV slots of its rejected tokens stay in the cache as masked holes,
so no row waits for another. Architectures with sliding-window layers are the exception:
transformers counts their window in cache slots, so a hole would shift it; there every row
commits the batch's shortest accepted prefix (still exact, just less speculative).

Draft length adapts per round: drafting stops once every row's draft confidence (top
probability) falls below `draft_threshold`, and k is chosen from the running acceptance rate
and the FLOP cost of a draft step and a verification (`DraftPolicy`). `draft_vocab` makes the
draft head score only the most frequent tokens (on a 135M model the head is a fifth of a
token's cost); verification always uses the full head, so the output stays exact.
"""

from __future__ import annotations

import collections
import json
import warnings
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F
from transformers.cache_utils import DynamicCache

from .errors import ExitError
from .model import BalconyModel, _positions, sampling_probs


def new_cache(config) -> DynamicCache:
    cache = DynamicCache(config=config)
    if hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()  # sliding-window layers must be able to roll back
    return cache


def has_sliding_layers(cache: DynamicCache) -> bool:
    return any(getattr(layer, "is_sliding", False) for layer in getattr(cache, "layers", []))


@dataclass
class SpeculativeStats:
    rounds: int = 0  # verification passes
    row_rounds: int = 0  # (row, round) pairs: a batch of 4 verifying once counts 4
    drafted: int = 0  # draft tokens verified, over all rows
    accepted: int = 0  # of those, accepted
    generated: int = 0  # tokens emitted, over all rows
    draft_lengths: collections.Counter = field(default_factory=collections.Counter)

    def as_dict(self) -> dict:
        return {
            "rounds": self.rounds,
            "row_rounds": self.row_rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "generated": self.generated,
            "acceptance_rate": self.accepted / max(self.drafted, 1),
            "mean_accepted": self.accepted / max(self.row_rounds, 1),  # accepted draft tokens per row and round
            "tokens_per_round": self.generated / max(self.row_rounds, 1),
            "draft_lengths": dict(sorted(self.draft_lengths.items())),
        }


class DraftPolicy:
    """How many tokens to draft next round: maximise expected tokens per unit of compute.

    With per-token acceptance a, a round of k drafts yields 1 + a + ... + a^(k-1) tokens on
    average and costs k draft steps plus one verification (whose cost grows a little with k).
    `a` is a running estimate from the rounds so far.
    """

    def __init__(self, max_draft: int, draft_cost: float, verify_cost: float, *, adaptive: bool = True,
                 prior: float = 0.5, momentum: float = 0.8, verify_growth: float = 0.1):
        self.max_draft, self.adaptive = max_draft, adaptive
        self.draft_cost, self.verify_cost, self.verify_growth = draft_cost, verify_cost, verify_growth
        self.acceptance, self.momentum = prior, momentum

    def tokens_per_cost(self, k: int) -> float:
        a = self.acceptance
        tokens = sum(a**t for t in range(k))
        return tokens / (k * self.draft_cost + self.verify_cost * (1 + self.verify_growth * (k - 1)))

    def next_k(self) -> int:
        if not self.adaptive:
            return self.max_draft
        return max(range(1, self.max_draft + 1), key=self.tokens_per_cost)

    def update(self, accepted: int, rejections: int) -> None:
        # per-token acceptance of a truncated geometric: accepted / (accepted + first rejections)
        if accepted + rejections:
            observed = accepted / (accepted + rejections)
            self.acceptance = self.momentum * self.acceptance + (1 - self.momentum) * observed


def draft_vocabulary(model: BalconyModel, size: int, texts: list[str] | None = None) -> torch.Tensor:
    """The `size` token ids the draft head scores: the most frequent in `texts`, then the lowest ids.

    `texts` defaults to the held-out text shipped with the default model (the model's own chat
    answers) when the base is the default model; byte-pair vocabularies number their tokens
    roughly by merge order, so low ids fill the rest. Special tokens are always in.
    """
    vocab_size = model.parts.head.weight.shape[0]
    if size >= vocab_size:
        return torch.arange(vocab_size)
    if size < 1:
        raise ValueError(f"draft_vocab must be a positive number of tokens, not {size}")
    cached = model.__dict__.setdefault("_draft_vocabularies", {})  # counting tokenises the texts: do it once
    if texts is None and size in cached:
        return cached[size]
    tokenizer = model.tokenizer
    texts_given = texts
    counts: collections.Counter = collections.Counter()
    if texts is None and tokenizer is not None and getattr(model.base.config, "name_or_path", None) == "default":
        from .default import HELDOUT_TEXT

        texts = [json.loads(line)["text"] for line in HELDOUT_TEXT.read_text().splitlines() if line.strip()]
    if texts and tokenizer is not None:
        for text in texts:
            counts.update(tokenizer(text, add_special_tokens=False)["input_ids"])
    chosen = dict.fromkeys(getattr(tokenizer, "all_special_ids", None) or [])
    chosen.update(dict.fromkeys(token for token, _ in counts.most_common()))
    chosen.update(dict.fromkeys(range(vocab_size)))
    ids = torch.tensor(sorted([t for t in chosen if 0 <= t < vocab_size][:size]), dtype=torch.long)
    if texts_given is None:
        cached[size] = ids
    return ids


def _needed(mask: torch.Tensor) -> torch.Tensor | None:
    # Without padding or holes the causal mask is all there is: leaving the padding mask out
    # lets attention take its fast causal path (an explicit mask costs several ms a layer on CPU)
    return None if bool(mask.all()) else mask


class _Passes:
    """The two forward passes of a round: draft (layers[:e] + balcony) and verify (layers[e:])."""

    def __init__(self, model: BalconyModel, draft_exit: int, vocab: torch.Tensor | None):
        self.model, self.exit = model, draft_exit
        self.trunk: dict = {}
        head = model.parts.head
        self.vocab = None if vocab is None else vocab.to(head.weight.device)
        self.weight = head.weight if vocab is None else head.weight[self.vocab]
        bias = getattr(head, "bias", None)
        self.bias = bias if bias is None or vocab is None else bias[self.vocab]
        with model.span_view(0, draft_exit) as view:
            self.draft_cache = new_cache(view.config)
        with model.span_view(draft_exit, None, self.trunk) as view:
            self.deep_cache = new_cache(view.config)

    def draft(self, ids, mask, positions):
        """Draft logits over the draft vocabulary, and the hidden states after layers[:e]."""
        mask = _needed(mask)
        with self.model.span_view(0, self.exit, self.trunk):
            hidden = self.model.parts.decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                                        cache=self.draft_cache, use_cache=True).last_hidden_state
        logits = self.model.cap_logits(F.linear(hidden[:, -1:], self.weight, self.bias))[:, 0]
        return logits, self.trunk["exit_states"]

    def verify(self, ids, states, mask, positions, last_only: bool = False):
        """The full model's logits at every position of `ids`, from their hidden states at depth e."""
        self.trunk["states"] = states
        mask = _needed(mask)
        with self.model.span_view(self.exit, None, self.trunk):
            hidden = self.model.parts.decoder(input_ids=ids, attention_mask=mask, position_ids=positions,
                                        cache=self.deep_cache, use_cache=True).last_hidden_state
        return self.model.logits(hidden[:, -1:] if last_only else hidden)

    def full_vocab(self, token: torch.Tensor) -> torch.Tensor:
        return token if self.vocab is None else self.vocab[token]

    def select_rows(self, rows: torch.Tensor) -> None:
        self.draft_cache.batch_select_indices(rows)
        self.deep_cache.batch_select_indices(rows)

    def crop(self, count: int) -> None:
        if count:
            self.draft_cache.crop(-count)
            self.deep_cache.crop(-count)


@torch.no_grad()
def speculative_generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    draft_exit: int,
    max_new_tokens: int,
    num_draft: int = 4,
    adaptive: bool = True,
    draft_threshold: float = 0.0,
    draft_vocab: int | torch.Tensor | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Decode like the full model (greedy: token for token; sampling: in distribution), drafted at `draft_exit`.

    `input_ids` may be a left-padded batch with its `attention_mask`. Returns the sequences
    (prompt + new tokens, rows that stopped early padded with `pad_token_id`, as transformers'
    `generate` does) and statistics: rounds, drafted and accepted tokens, acceptance rate,
    mean accepted length, the draft lengths used.
    """
    draft_exit = model.check_exit(draft_exit)
    if draft_exit is None:
        raise ExitError(f"the draft must be a balcony exit, one of {model.exits}, not the full model")
    if max_new_tokens < 1 or num_draft < 1:
        raise ValueError("max_new_tokens and num_draft must be at least 1")
    if do_sample and not (temperature > 0 and 0 < top_p <= 1):
        raise ValueError("sampling needs temperature > 0 and top_p in (0, 1]")
    if not do_sample and model.dtype in (torch.bfloat16, torch.float16):
        # measured on the default model in bf16: 5 of 8 greedy answers identical at exit 15
        warnings.warn(f"speculative decoding on a {model.dtype} model: verifying several tokens in one pass rounds "
                      "differently from one-token steps, so greedy output equals the full model's only up to that "
                      "rounding (a near-tie can flip); load the base in float32 for token-for-token equality",
                      stacklevel=2)
    device = model.device
    input_ids = input_ids.to(device)
    batch = input_ids.shape[0]
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
    if isinstance(draft_vocab, int):
        draft_vocab = draft_vocabulary(model, draft_vocab)
    if draft_vocab is not None:  # the prompts' own tokens are likely to be copied: let the draft say them
        draft_vocab = torch.unique(torch.cat([draft_vocab.to(device), input_ids[mask.bool()]]))
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)

    # costs as fractions of a full-model token (FLOP model): a draft step runs e layers, the
    # balcony and the (maybe reduced) head; a verification runs the other L - e layers and the head
    head = 2 * model.parts.head.weight.numel() / model.flops_per_token(None)
    draft_head = head if draft_vocab is None else head * len(draft_vocab) / model.parts.head.weight.shape[0]
    layer = (1 - head) / model.num_layers
    policy = DraftPolicy(num_draft, model.relative_cost(draft_exit) - head + draft_head,
                         (model.num_layers - draft_exit) * layer + head, adaptive=adaptive)
    stats = SpeculativeStats()

    def choose(probs_or_logits: torch.Tensor) -> torch.Tensor:
        if do_sample:
            return torch.multinomial(probs_or_logits, 1, generator=generator)[:, 0]
        return probs_or_logits.argmax(-1)

    outputs: list[list[int]] = [[] for _ in range(batch)]
    rows = torch.arange(batch, device=device)  # original index of each row still decoding
    with model._lock:
        passes = _Passes(model, draft_exit, draft_vocab)
        lockstep = batch > 1 and (has_sliding_layers(passes.draft_cache) or has_sliding_layers(passes.deep_cache))
        positions = _positions(mask)
        _, states = passes.draft(input_ids, mask, positions)
        logits = passes.verify(input_ids, states, mask, positions, last_only=True)[:, -1]
        first = choose(sampling_probs(logits, temperature, top_p) if do_sample else logits)
        next_pos = mask.sum(-1)  # position of each row's pending token
        pending = first  # emitted, not yet in any cache
        for r, token in enumerate(first.tolist()):
            outputs[r].append(token)

        def finished(r: int) -> bool:
            out = outputs[r]
            return len(out) >= max_new_tokens or (eos_token_id is not None and eos_token_id in out)

        while True:
            alive = [i for i, r in enumerate(rows.tolist()) if not finished(r)]
            if not alive:
                break
            if len(alive) < len(rows):  # drop finished rows from the batch and both caches
                keep = torch.tensor(alive, device=device)
                rows, mask, next_pos, pending = rows[keep], mask[keep], next_pos[keep], pending[keep]
                passes.select_rows(keep)
            n_rows = len(rows)
            remaining = max(max_new_tokens - len(outputs[r]) for r in rows.tolist())
            k = min(policy.next_k(), remaining)

            # 1. draft
            drafts, draft_probs, draft_states = [], [], []
            ids = pending[:, None]
            for j in range(k):
                step_mask = torch.cat([mask, mask.new_ones(n_rows, j + 1)], 1)
                logits, states = passes.draft(ids, step_mask, (next_pos + j)[:, None])
                draft_states.append(states)
                if do_sample:
                    probs = sampling_probs(logits, temperature, top_p)
                    token = choose(probs)
                    draft_probs.append(probs)
                else:
                    probs = None
                    token = logits.argmax(-1)
                drafts.append(passes.full_vocab(token))
                ids = drafts[-1][:, None]
                if draft_threshold > 0 and j + 1 < k:
                    confidence = (probs if probs is not None else logits.float().softmax(-1)).amax(-1)
                    if bool((confidence < draft_threshold).all()):
                        k = j + 1
                        break
            drafted = torch.stack(drafts, 1)  # [rows, k]

            # 2. verify [pending, d1 .. d_{k-1}]: the full model's distribution after each
            verify_ids = torch.cat([pending[:, None], drafted[:, :-1]], 1)
            verify_mask = torch.cat([mask, mask.new_ones(n_rows, k)], 1)
            verify_pos = next_pos[:, None] + torch.arange(k, device=device)
            target = passes.verify(verify_ids, torch.cat(draft_states, 1), verify_mask, verify_pos)

            # 3. accept
            if do_sample:
                p = sampling_probs(target, temperature, top_p)  # [rows, k, V]
                q = torch.zeros_like(p)
                for j, probs in enumerate(draft_probs):
                    if passes.vocab is None:
                        q[:, j] = probs
                    else:
                        q[:, j].index_copy_(-1, passes.vocab, probs)
                p_d = p.gather(-1, drafted[..., None])[..., 0]
                q_d = q.gather(-1, drafted[..., None])[..., 0]
                u = torch.rand(p_d.shape, generator=generator, device=device)
                ok = u * q_d < p_d  # u < p/q, safe where q is 0
            else:
                choice = target.argmax(-1)
                ok = drafted == choice
            accepted = ok.long().cumprod(1).sum(1)  # [rows]
            corrections = torch.empty_like(pending)
            for i, a in enumerate(accepted.tolist()):
                if a < k:
                    if do_sample:
                        residual = (p[i, a] - q[i, a]).clamp(min=0)
                        residual = residual if float(residual.sum()) > 0 else p[i, a]
                        corrections[i] = torch.multinomial(residual / residual.sum(), 1, generator=generator)[0]
                    else:
                        corrections[i] = choice[i, a]
                else:
                    corrections[i] = drafted[i, -1]
            kept = torch.clamp(accepted + 1, max=k)  # tokens emitted = KV entries kept per row
            if lockstep:
                kept = kept.min().expand(n_rows).clone()
            stats.rounds += 1
            stats.row_rounds += n_rows
            stats.drafted += n_rows * k
            stats.accepted += int(accepted.sum())
            stats.draft_lengths[k] += 1
            policy.update(int(accepted.sum()), int((accepted < k).sum()))

            streams = torch.cat([drafted, drafted[:, -1:]], 1)  # d1..dk, then the correction slot
            streams[torch.arange(n_rows, device=device), accepted] = corrections
            longest = int(kept.max())
            passes.crop(k - longest)
            new_pending = streams[torch.arange(n_rows, device=device), kept - 1]
            for i, (r, c) in enumerate(zip(rows.tolist(), kept.tolist())):
                for token in streams[i, :c].tolist():
                    if not finished(r):
                        outputs[r].append(token)
            # each row's kept entries, then holes up to the longest: masked, never attended
            holes = torch.arange(longest, device=device)[None, :] < kept[:, None]
            mask = torch.cat([mask, holes.long()], 1)
            next_pos = next_pos + kept
            pending = new_pending

    width = max(len(out) for out in outputs)
    new = torch.full((batch, width), pad, dtype=input_ids.dtype, device=device)
    for r, out in enumerate(outputs):
        if eos_token_id is not None and eos_token_id in out:
            out = out[: out.index(eos_token_id) + 1]
        new[r, : len(out)] = torch.tensor(out, dtype=input_ids.dtype)
    stats.generated = sum(len(o) for o in outputs)
    return torch.cat([input_ids, new], 1), stats.as_dict()
