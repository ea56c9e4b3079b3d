"""What the engine samples each row from, and the log-probabilities it reports.

A row's logits are those of the exit that serves it (after the exit's head). Before sampling
they get the request's logit processing, as OpenAI and vLLM define it: `logit_bias` added per
token id; OpenAI's presence and frequency penalties over the tokens generated so far
(`logit[t] -= frequency * count[t] + presence * (count[t] > 0)`); vLLM's repetition penalty over
prompt and output (a positive logit divided by it, a negative one multiplied); end-of-sequence
masked before `min_tokens`; then temperature, `top_k` and `top_p`. The log-probabilities a
request asks for are those of the exit's own distribution, before any of this (vLLM's default
too), so they do not depend on the sampling settings.
"""

from __future__ import annotations

import torch

from ..decoding.sampling import draw, sampling_probs
from .job import Job

Score = tuple[float, list[tuple[int, float]]]  # a token's log-probability, and the k most likely


def scores(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[Score]:
    """Per position of `logits` [n, vocab]: the log-probability of `tokens` [n] and the top k."""
    logprobs = logits.float().log_softmax(-1)
    chosen = logprobs.gather(-1, tokens[:, None].to(logprobs.device))[:, 0].tolist()
    top_values, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return [(lp, list(zip(ids, values))) for lp, ids, values in zip(chosen, top_ids.tolist(), top_values.tolist())]


def generators(jobs: list[Job]) -> list[torch.Generator | None]:
    """Each seeded request's own sampling generator (None: the global one)."""
    return [None if j.seed is None else torch.Generator(device="cpu").manual_seed(j.seed) for j in jobs]


def _processed(logits: torch.Tensor, job: Job, eos: set[int]) -> torch.Tensor:
    """One row's logits after the request's bias and penalties (a copy when any applies)."""
    holds_eos = len(job.tokens) < job.min_tokens and not job.ignore_eos and eos
    if not (job.penalized or holds_eos):
        return logits
    logits = logits.clone()
    device, vocab = logits.device, logits.shape[-1]
    if job.tokens and (job.presence_penalty or job.frequency_penalty):
        counts = torch.bincount(torch.tensor(job.tokens, device=device), minlength=vocab)[:vocab].to(logits.dtype)
        logits -= job.frequency_penalty * counts + job.presence_penalty * (counts > 0).to(logits.dtype)
    if job.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(job.prompt_ids) | set(job.tokens)), device=device)
        values = logits[seen]
        logits[seen] = torch.where(values > 0, values / job.repetition_penalty, values * job.repetition_penalty)
    if job.logit_bias:
        ids = torch.tensor(list(job.logit_bias), device=device)
        logits[ids] += torch.tensor(list(job.logit_bias.values()), device=device, dtype=logits.dtype)
    if holds_eos:
        logits[torch.tensor(sorted(eos), device=device)] = float("-inf")
    return logits


def _sample(logits: torch.Tensor, job: Job, generator: torch.Generator | None) -> int:
    if 0 < job.top_k < logits.shape[-1]:
        kth = logits.topk(job.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(draw(sampling_probs(logits, job.temperature, job.top_p), generator))


def pick(logits: torch.Tensor, jobs: list[Job], generators: list, eos: set[int]) -> tuple[torch.Tensor, list]:
    """Each row's next token, and its `Score` for the rows whose request asked for logprobs (else None)."""
    picked = logits.argmax(-1)
    for row, (job, generator) in enumerate(zip(jobs, generators)):
        row_logits = _processed(logits[row], job, eos)
        if job.temperature > 0 and job.top_p > 0:  # top_p 0 keeps only the most likely token: greedy
            picked[row] = _sample(row_logits, job, generator)
        elif row_logits is not logits[row]:
            picked[row] = row_logits.argmax()
    wanted = [row for row, job in enumerate(jobs) if job.logprobs is not None]
    entries: list[Score | None] = [None] * len(jobs)
    if wanted:
        k = max(jobs[row].logprobs for row in wanted)
        index = torch.tensor(wanted, device=logits.device)
        for row, (lp, top) in zip(wanted, scores(logits[index], picked[index], k)):
            entries[row] = (lp, top[: jobs[row].logprobs])
    return picked, entries


def prompt_scores(model, job: Job) -> list[Score | None]:
    """The prompt's own tokens scored by the exit serving `job` (the first token has no score)."""
    ids = torch.tensor([job.prompt_ids], device=model.device)
    logits = model(input_ids=ids, exit_layer=job.exit_layer).logits[0, :-1]
    return [None, *scores(logits, ids[0, 1:], job.logprobs or 0)]
