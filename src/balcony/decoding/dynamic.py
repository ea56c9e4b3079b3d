"""Token-level dynamic exits: each token leaves at the first balcony confident enough.

The stack is cut at the exits e1 < e2 < ... into spans: layers[0:e1] + balcony e1,
layers[e1:e2] + balcony e2, ..., layers[en:L] + final norm. Each span has its own KV cache
(`BalconyModel.span`). A token runs span after span until a balcony's top probability
exceeds `threshold` (or the full model is reached) and is emitted there.

A token that left early skipped the deeper spans, but later tokens attend to its keys and
values in those layers. As in EE-LLM, their computation is deferred, not dropped: each span
keeps the hidden states (at its input depth) of the tokens that have not been through it
yet, and the next token that needs the span runs them with it in one batched pass. So every
KV entry is exactly what running every layer for every token would give, and the sequential
depth a token pays for is only its own (the deferred work is batched into a pass that runs
anyway). With the threshold at 1.0 no token exits early and the output is the full model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import ExitError
from ..core.generation import register_mode
from ..core.model import BalconyModel
from .speculative import draft_vocabulary


@dataclass
class DynamicStats:
    exits: list[int] = field(default_factory=list)  # per generated token: the depth it left at (L = full)
    layer_passes: int = 0  # layers run sequentially for the generated tokens (the latency-bound work)
    deferred: int = 0  # (token, layer) computations made up later for skipped layers, batched
    num_layers: int = 0

    def as_dict(self) -> dict:
        n = max(len(self.exits), 1)
        depths = sorted(set(self.exits))
        return {
            "exits": self.exits,
            "mean_exit": sum(self.exits) / n,
            "exit_share": {str(d): self.exits.count(d) / n for d in depths},
            # sequential layer passes saved against running all L layers per token
            "compute_saved": 1 - self.layer_passes / (n * self.num_layers),
            "deferred_layer_computations": self.deferred,
        }


class DynamicDecoder:
    """Greedy decoding of one sequence with per-token exits; keeps one KV cache per span."""

    def __init__(self, model: BalconyModel, threshold: float, exits: list[int] | None = None,
                 draft_vocab: torch.Tensor | None = None):
        if not 0 <= threshold <= 1:
            raise ValueError(f"threshold is a probability in [0, 1] (1.0: the full model), not {threshold}")
        self.model, self.threshold = model, threshold
        # Screening with a reduced head: a balcony's top probability over `draft_vocab` only
        # is at least its full top probability whenever the full argmax is in the subset, so
        # a token is checked with the full head only if the cheap check passes (the rule can
        # only exit less often than the full-head rule, never more).
        head = model.parts.head
        self.screen = None if draft_vocab is None else (head.weight[draft_vocab.to(head.weight.device)],
                                                        None if getattr(head, "bias", None) is None
                                                        else head.bias[draft_vocab.to(head.weight.device)])
        exits = model.exits if exits is None else sorted({model.policy.check_exit(e) for e in exits} - {None})
        if not exits:
            raise ExitError(f"dynamic exits need at least one balcony; this model has {model.exits}")
        self.starts = [0, *exits]  # span s runs layers[starts[s]:stops[s]]
        self.stops: list[int | None] = [*exits, None]
        self.spans = [model.span(start, stop) for start, stop in zip(self.starts, self.stops)]
        self.caches = [span.new_cache() for span in self.spans]
        # per span: hidden states (at the span's input depth) of tokens not yet run through it
        self.waiting: list[list[torch.Tensor]] = [[] for _ in self.starts]
        self.stats = DynamicStats(num_layers=model.num_layers)

    def _run(self, span: int, ids: torch.Tensor | None, states: torch.Tensor | None) -> torch.Tensor:
        """Run span `span` on these tokens (ids for the first span, trunk states for the others);
        returns the normalised hidden state of the last one and queues the trunk states for the next span."""
        runner = self.spans[span]
        hidden = runner(ids, states=states, cache=self.caches[span])
        if self.stops[span] is not None:  # the trunk state that entered the balcony: the next span's input
            self.waiting[span + 1].append(runner.exit_states)
        return hidden[:, -1]

    def _confident(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """The full logits if the top probability exceeds the threshold, else None."""
        if self.threshold >= 1:
            return None
        if self.screen is not None:
            cheap = self.model.cap_logits(torch.nn.functional.linear(hidden, *self.screen))
            if float(cheap.float().softmax(-1).max()) <= self.threshold:
                return None
        logits = self.model.logits(hidden)
        return logits if float(logits.float().softmax(-1).max()) > self.threshold else None

    def _through(self, span: int, ids: torch.Tensor) -> torch.Tensor:
        """Span `span` for the newest token, together with every token still waiting for it."""
        states = None
        if span > 0:
            states = torch.cat(self.waiting[span], 1)
            self.waiting[span] = []
            self.stats.deferred += (states.shape[1] - 1) * (self._stop_layer(span) - self.starts[span])
        return self._run(span, ids if states is None else None, states)

    def _stop_layer(self, span: int) -> int:
        stop = self.stops[span]
        return self.model.num_layers if stop is None else stop

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor) -> int:
        """The prompt through every span (the full model); returns its greedy next token."""
        for span in range(len(self.starts)):
            hidden = self._through(span, input_ids) if span else self._run(0, input_ids, None)
        return int(self.model.logits(hidden).argmax(-1))

    @torch.no_grad()
    def step(self, token: int) -> int:
        """Feed one token; return the next, from the first confident exit."""
        ids = torch.tensor([[token]], device=self.model.device)
        for span in range(len(self.starts)):
            hidden = self._run(0, ids, None) if span == 0 else self._through(span, ids)
            last = span == len(self.starts) - 1
            logits = self.model.logits(hidden) if last else self._confident(hidden)
            if logits is not None:
                depth = self._stop_layer(span)
                self.stats.exits.append(depth)
                self.stats.layer_passes += depth + (0 if last else 1)  # the balcony is a layer too
                return int(logits.argmax(-1))
        raise AssertionError("unreachable: the last span always emits")

    @torch.no_grad()
    def flush(self) -> None:
        """Run the deferred spans for every waiting token, so every cache covers every fed token."""
        for span in range(1, len(self.starts)):
            if self.waiting[span]:
                states = torch.cat(self.waiting[span], 1)
                self.waiting[span] = []
                self.stats.deferred += states.shape[1] * (self._stop_layer(span) - self.starts[span])
                self._run(span, None, states)


@torch.no_grad()
def dynamic_generate(
    model: BalconyModel,
    input_ids: torch.Tensor,
    *,
    threshold: float,
    max_new_tokens: int,
    exits: list[int] | None = None,
    draft_vocab: int | torch.Tensor | None = None,
    eos_token_id: int | None = None,
) -> tuple[torch.Tensor, dict]:
    """Greedy decoding where each token leaves at the first exit whose top probability exceeds `threshold`.

    Batch size 1. `draft_vocab` (a number of most frequent tokens, or their ids) screens each
    balcony with a reduced head first, so the full head runs only where a token may exit. Returns the sequence and statistics: per-token exit depth, mean depth, the
    share of tokens per exit, sequential layer passes saved, deferred layer computations.
    """
    if input_ids.shape[0] != 1:
        raise ValueError("dynamic exits decode one sequence at a time: pass a batch of 1")
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    if isinstance(draft_vocab, int):
        draft_vocab = draft_vocabulary(model, draft_vocab)
    decoder = DynamicDecoder(model, threshold, exits, draft_vocab)
    out = [decoder.prefill(input_ids.to(model.device))]
    while len(out) < max_new_tokens and (eos_token_id is None or out[-1] != eos_token_id):
        out.append(decoder.step(out[-1]))
    sequence = torch.cat([input_ids, torch.tensor([out], dtype=input_ids.dtype, device=input_ids.device)], 1)
    return sequence, decoder.stats.as_dict()


OPTIONS = {"threshold", "exits", "draft_vocab", "attention_mask", "do_sample"}


def _generate(model: BalconyModel, input_ids, *, max_new_tokens: int, eos_token_id=None, pad_token_id=None,
              threshold=None, do_sample: bool = False, attention_mask=None, **options):
    if do_sample:
        raise ExitError("mode='dynamic' decodes greedily: drop do_sample")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ExitError("mode='dynamic' decodes one unpadded sequence: pass a batch of 1 without padding")
    if threshold is None:
        raise ExitError("mode='dynamic' needs threshold= (a top probability in [0, 1]; 1.0: the full model)")
    return dynamic_generate(model, input_ids, threshold=threshold, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_token_id, **options)


register_mode("dynamic", OPTIONS, _generate)
