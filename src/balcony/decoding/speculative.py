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
import warnings
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from ..core.errors import ExitError
from ..core.exits import has_sliding_layers, positions_from_mask
from ..core.generation import register_mode
from ..core.model import BalconyModel
from .sampling import draw, sampling_probs


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
        from ..default import heldout_texts

        texts = heldout_texts()
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


class Passes:
    """The two forward passes of a round: draft (layers[:e] + balcony) and verify (layers[e:])."""

    def __init__(self, model: BalconyModel, draft_exit: int, vocab: torch.Tensor | None):
        self.model, self.exit = model, draft_exit
        head = model.parts.head
        self.vocab = None if vocab is None else vocab.to(head.weight.device)
        self.weight = head.weight if vocab is None else head.weight[self.vocab]
        bias = getattr(head, "bias", None)
        self.bias = bias if bias is None or vocab is None else bias[self.vocab]
        self.shallow, self.deep = model.span(0, draft_exit), model.span(draft_exit, None)
        self.draft_cache, self.deep_cache = self.shallow.new_cache(), self.deep.new_cache()

    def draft(self, ids, mask, positions):
        """Draft logits over the draft vocabulary, and the hidden states after layers[:e]."""
        hidden = self.shallow(ids, attention_mask=_needed(mask), position_ids=positions, cache=self.draft_cache)
        logits = self.model.cap_logits(F.linear(hidden[:, -1:], self.weight, self.bias))[:, 0]
        return logits, self.shallow.exit_states

    def verify(self, states, mask, positions, last_only: bool = False):
        """The full model's logits at every position, from the tokens' hidden states at depth e."""
        hidden = self.deep(states=states, attention_mask=_needed(mask), position_ids=positions, cache=self.deep_cache)
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


@dataclass
class _Batch:
    """The rows still decoding: their original index, padding mask, next position, pending token."""

    rows: torch.Tensor
    mask: torch.Tensor
    next_pos: torch.Tensor
    pending: torch.Tensor  # emitted, not yet in any cache

    def keep(self, alive: torch.Tensor) -> None:
        self.rows, self.mask = self.rows[alive], self.mask[alive]
        self.next_pos, self.pending = self.next_pos[alive], self.pending[alive]


class _Sampler:
    """Greedy choice, or sampling with temperature / top-p from one generator."""

    def __init__(self, do_sample: bool, temperature: float, top_p: float, generator: torch.Generator | None):
        self.do_sample, self.temperature, self.top_p, self.generator = do_sample, temperature, top_p, generator

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        return sampling_probs(logits, self.temperature, self.top_p)

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Chosen tokens and, when sampling, the probabilities they were drawn from."""
        if not self.do_sample:
            return logits.argmax(-1), None
        probs = self.probs(logits)
        return draw(probs, self.generator), probs

    def accept(self, drafted, draft_probs, target, vocab) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: how many drafts the full model accepts, and its own token after them."""
        k = drafted.shape[1]
        if not self.do_sample:
            choice = target.argmax(-1)
            accepted = (drafted == choice).long().cumprod(1).sum(1)
            at = accepted.clamp(max=k - 1)
            corrections = torch.where(accepted < k, choice.gather(1, at[:, None])[:, 0], drafted[:, -1])
            return accepted, corrections
        p = self.probs(target)  # [rows, k, V]
        q = torch.zeros_like(p)
        for j, probs in enumerate(draft_probs):
            if vocab is None:
                q[:, j] = probs
            else:
                q[:, j].index_copy_(-1, vocab, probs)
        p_d = p.gather(-1, drafted[..., None])[..., 0]
        q_d = q.gather(-1, drafted[..., None])[..., 0]
        u = torch.rand(p_d.shape, generator=self.generator, device=p.device)
        accepted = (u * q_d < p_d).long().cumprod(1).sum(1)  # u < p/q, safe where q is 0
        corrections = drafted[:, -1].clone()
        for i, a in enumerate(accepted.tolist()):
            if a < k:  # the standard rule: draw from max(0, p - q), renormalised
                residual = (p[i, a] - q[i, a]).clamp(min=0)
                residual = residual if float(residual.sum()) > 0 else p[i, a]
                corrections[i] = draw(residual, self.generator)
        return accepted, corrections


class SpeculativeDecoder:
    """One speculative generation: the passes, the draft policy, the outputs and statistics."""

    def __init__(self, model: BalconyModel, draft_exit: int, *, num_draft: int, adaptive: bool, draft_threshold: float,
                 draft_vocab: torch.Tensor | None, sampler: _Sampler, max_new_tokens: int, eos_token_id: int | None):
        self.model, self.sampler, self.threshold = model, sampler, draft_threshold
        self.max_new_tokens, self.eos = max_new_tokens, eos_token_id
        self.passes = Passes(model, draft_exit, draft_vocab)
        # costs as fractions of a full-model token: a draft step runs e layers, the balcony and the
        # (maybe reduced) head; a verification runs the other L - e layers and the full head
        costs, vocab_size = model.costs, model.parts.head.weight.shape[0]
        head_fraction = 1.0 if draft_vocab is None else len(draft_vocab) / vocab_size
        self.policy = DraftPolicy(num_draft, costs.share(costs.depths[draft_exit], head_fraction),
                                  costs.share(model.num_layers - draft_exit), adaptive=adaptive)
        self.stats = SpeculativeStats()
        self.outputs: list[list[int]] = []

    def finished(self, r: int) -> bool:
        out = self.outputs[r]
        return len(out) >= self.max_new_tokens or (self.eos is not None and self.eos in out)

    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor) -> _Batch:
        positions = positions_from_mask(mask)
        _, states = self.passes.draft(input_ids, mask, positions)
        first, _ = self.sampler.choose(self.passes.verify(states, mask, positions, last_only=True)[:, -1])
        self.outputs = [[token] for token in first.tolist()]
        return _Batch(torch.arange(len(first), device=first.device), mask, mask.sum(-1), first)

    def run(self, batch: _Batch, lockstep: bool) -> None:
        while True:
            alive = [i for i, r in enumerate(batch.rows.tolist()) if not self.finished(r)]
            if not alive:
                return
            if len(alive) < len(batch.rows):  # drop finished rows from the batch and both caches
                keep = torch.tensor(alive, device=batch.rows.device)
                batch.keep(keep)
                self.passes.select_rows(keep)
            remaining = max(self.max_new_tokens - len(self.outputs[r]) for r in batch.rows.tolist())
            drafted, draft_probs, states = self.draft(batch, min(self.policy.next_k(), remaining))
            k = drafted.shape[1]
            # verify [pending, d1 .. d_{k-1}]: the full model's distribution after each
            n_rows, device = len(batch.rows), drafted.device
            target = self.passes.verify(states, torch.cat([batch.mask, batch.mask.new_ones(n_rows, k)], 1),
                                        batch.next_pos[:, None] + torch.arange(k, device=device))
            accepted, corrections = self.sampler.accept(drafted, draft_probs, target, self.passes.vocab)
            self.commit(batch, drafted, accepted, corrections, lockstep)

    def draft(self, batch: _Batch, k: int) -> tuple[torch.Tensor, list, torch.Tensor]:
        """Up to k draft tokens per row, the probabilities they were drawn from, their trunk states."""
        drafts, draft_probs, draft_states = [], [], []
        ids, n_rows = batch.pending[:, None], len(batch.rows)
        for j in range(k):
            step_mask = torch.cat([batch.mask, batch.mask.new_ones(n_rows, j + 1)], 1)
            logits, states = self.passes.draft(ids, step_mask, (batch.next_pos + j)[:, None])
            draft_states.append(states)
            token, probs = self.sampler.choose(logits)
            draft_probs.append(probs)
            drafts.append(self.passes.full_vocab(token))
            ids = drafts[-1][:, None]
            if self.threshold > 0 and j + 1 < k:
                confidence = (probs if probs is not None else logits.float().softmax(-1)).amax(-1)
                if bool((confidence < self.threshold).all()):
                    break
        return torch.stack(drafts, 1), draft_probs, torch.cat(draft_states, 1)

    def commit(self, batch: _Batch, drafted, accepted, corrections, lockstep: bool) -> None:
        """Emit each row's accepted drafts and correction; drop the rejected tokens' KV entries."""
        n_rows, k = drafted.shape
        device = drafted.device
        kept = torch.clamp(accepted + 1, max=k)  # tokens emitted = KV entries kept per row
        if lockstep:
            kept = kept.min().expand(n_rows).clone()
        self.stats.rounds += 1
        self.stats.row_rounds += n_rows
        self.stats.drafted += n_rows * k
        self.stats.accepted += int(accepted.sum())
        self.stats.draft_lengths[k] += 1
        self.policy.update(int(accepted.sum()), int((accepted < k).sum()))
        streams = torch.cat([drafted, drafted[:, -1:]], 1)  # d1..dk, then the correction slot
        streams[torch.arange(n_rows, device=device), accepted] = corrections
        longest = int(kept.max())
        self.passes.crop(k - longest)
        for i, (r, c) in enumerate(zip(batch.rows.tolist(), kept.tolist())):
            for token in streams[i, :c].tolist():
                if not self.finished(r):
                    self.outputs[r].append(token)
        # each row's kept entries, then holes up to the longest: masked, never attended
        holes = torch.arange(longest, device=device)[None, :] < kept[:, None]
        batch.mask = torch.cat([batch.mask, holes.long()], 1)
        batch.pending = streams[torch.arange(n_rows, device=device), kept - 1]
        batch.next_pos = batch.next_pos + kept

    def sequences(self, input_ids: torch.Tensor, pad: int) -> torch.Tensor:
        width = max(len(out) for out in self.outputs)
        new = torch.full((len(self.outputs), width), pad, dtype=input_ids.dtype, device=input_ids.device)
        for r, out in enumerate(self.outputs):
            if self.eos is not None and self.eos in out:
                out = out[: out.index(self.eos) + 1]
            new[r, : len(out)] = torch.tensor(out, dtype=input_ids.dtype)
        self.stats.generated = sum(len(o) for o in self.outputs)
        return torch.cat([input_ids, new], 1)


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
    draft_exit = model.policy.check_exit(draft_exit)
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
    input_ids = input_ids.to(model.device)
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(model.device).long()
    if isinstance(draft_vocab, int):
        draft_vocab = draft_vocabulary(model, draft_vocab)
    if draft_vocab is not None:  # the prompts' own tokens are likely to be copied: let the draft say them
        draft_vocab = torch.unique(torch.cat([draft_vocab.to(model.device), input_ids[mask.bool()]]))
    decoder = SpeculativeDecoder(model, draft_exit, num_draft=num_draft, adaptive=adaptive,
                                 draft_threshold=draft_threshold, draft_vocab=draft_vocab,
                                 sampler=_Sampler(do_sample, temperature, top_p, generator),
                                 max_new_tokens=max_new_tokens, eos_token_id=eos_token_id)
    passes = decoder.passes
    lockstep = input_ids.shape[0] > 1 and (has_sliding_layers(passes.draft_cache) or has_sliding_layers(passes.deep_cache))
    decoder.run(decoder.prefill(input_ids, mask), lockstep)
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    return decoder.sequences(input_ids, pad), decoder.stats.as_dict()


OPTIONS = {"draft_exit", "num_draft", "adaptive", "draft_threshold", "draft_vocab", "do_sample", "temperature", "top_p",
           "generator", "attention_mask"}


def _generate(model: BalconyModel, input_ids, *, draft_exit=None, **options):
    if draft_exit is None:
        raise ExitError(f"mode='speculative' needs draft_exit=, one of {model.exits}")
    return speculative_generate(model, input_ids, draft_exit=draft_exit, **options)


register_mode("speculative", OPTIONS, _generate)
