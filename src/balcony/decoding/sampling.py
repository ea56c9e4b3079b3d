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


def draw(probs: torch.Tensor, generator: torch.Generator | None = None, uniform: torch.Tensor | None = None) -> torch.Tensor:
    """One index per row of `probs` (weights over the last dimension, any scale): inverse CDF with
    one uniform number per row from `generator`; or, given `uniform` [rows, n] in [0, 1), n
    indices per row (with replacement), one for each. `torch.multinomial` takes about a
    millisecond per 49k-token row on a CPU, which a batch of sampled requests pays every step;
    this takes ~50 us."""
    cdf = probs.float().cumsum(-1)
    one = uniform is None
    if one:
        uniform = torch.rand(cdf.shape[:-1] + (1,), generator=generator, device=cdf.device)
    u = uniform.to(cdf.device) * cdf[..., -1:]
    # the first index whose cumulative weight passes u: zero-weight tokens are never drawn
    drawn = torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[-1] - 1)
    return drawn.squeeze(-1) if one else drawn


class DrawnToken(LogitsProcessor):
    """Sampling inside transformers' `generate`, with `draw`: this processor samples each row
    (temperature, then top-k, then top-p, in the order of `generate`'s own warpers) and leaves only
    the drawn token, so `generate(do_sample=False, logits_processor=[DrawnToken(...)])` emits samples
    from the distribution `do_sample=True` gives with the same settings. With top-k it works on the
    k best tokens only: no sort of the whole vocabulary, and no `torch.multinomial` (about 17 ms a
    step for 16 rows of a 49k vocabulary on this CPU)."""

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int | None = None,
                 generator: torch.Generator | None = None):
        if temperature <= 0 or not 0 < top_p <= 1 or (top_k is not None and top_k < 1):
            raise ValueError(f"sampling needs temperature > 0, top_p in (0, 1] and top_k >= 1, not {temperature}, "
                             f"{top_p} and {top_k}")
        self.temperature, self.top_p, self.top_k, self.generator = temperature, top_p, top_k, generator

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.top_k is not None and self.top_k < scores.shape[-1]:
            best, ids = scores.topk(self.top_k, dim=-1)  # sorted, best first
            picked = ids.gather(1, draw(sampling_probs(best, self.temperature, self.top_p), self.generator)[:, None])
        else:
            picked = draw(sampling_probs(scores, self.temperature, self.top_p), self.generator)[:, None]
        return torch.full_like(scores, float("-inf")).scatter_(1, picked.to(scores.device), 0.0)
