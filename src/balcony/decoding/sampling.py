"""What a sampler draws from, shared by every decoder (speculative, the serving engine)."""

from __future__ import annotations

import torch
from transformers import LogitsProcessor


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Probabilities after temperature and nucleus (top-p) filtering.

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


def draw(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One index per row of `probs` (weights over the last dimension, any scale): inverse CDF with
    one uniform number per row from `generator`. `torch.multinomial` takes about a millisecond per
    49k-token row on a CPU, which a batch of sampled requests pays every step; this takes ~50 us."""
    cdf = probs.float().cumsum(-1)
    u = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device) * cdf[..., -1:]
    # the first index whose cumulative weight passes u: zero-weight tokens are never drawn
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=probs.shape[-1] - 1)


class DrawnToken(LogitsProcessor):
    """Sampling inside transformers' `generate`, with `draw`: this processor samples each row
    (temperature, top-p) and leaves only the drawn token, so `generate(do_sample=False,
    logits_processor=[DrawnToken(...)])` emits samples from the same distribution as
    `do_sample=True`, without `torch.multinomial`'s cost (tens of ms a step for a batch of 16 rows
    of a 49k vocabulary on this CPU)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None):
        if temperature <= 0 or not 0 < top_p <= 1:
            raise ValueError(f"sampling needs temperature > 0 and top_p in (0, 1], not {temperature} and {top_p}")
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        picked = draw(sampling_probs(scores, self.temperature, self.top_p), self.generator)
        return torch.full_like(scores, float("-inf")).scatter_(1, picked[:, None].to(scores.device), 0.0)
