"""What a sampler draws from, shared by every decoder (speculative, the serving engine)."""

from __future__ import annotations

import torch


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
