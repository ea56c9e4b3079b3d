"""One generation request as the engine sees it: prompt token ids and sampling settings in,
tokens, text and log-probabilities out, events to whoever waits on it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Job:
    """One generation request: prompt token ids in, text deltas out through `emit`."""

    prompt_ids: list[int]
    max_tokens: int
    exit_layer: int | None  # for an unpinned job, set by the policy when its batch forms
    pinned: bool = True  # False: the load-adaptive policy picks the exit
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: every token
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # keep going past EOS (calibration, benchmarks)
    min_tokens: int = 0  # no EOS before this many tokens
    # OpenAI's penalties over the tokens generated so far, vLLM's repetition penalty over prompt and
    # output, and a bias per token id: all applied to the logits before sampling
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k: each token's log-probability and the k most likely
    prompt_logprobs: bool = False  # score the prompt too (echo)
    # emit(kind, payload): ("start", exit) when its batch forms, ("delta", (text, tokens covered)) as
    # text becomes final, then ("done", {...}) or ("error", message) once.
    emit: Callable[[str, object], None] = lambda kind, payload: None
    cancelled: bool = False
    finished: bool = False
    tokens: list[int] = field(default_factory=list)
    # per token: (log-probability, [(token id, log-probability)] of the most likely), when asked
    token_logprobs: list[tuple[float, list[tuple[int, float]]]] = field(default_factory=list)
    prompt_scores: list[tuple[float, list[tuple[int, float]]] | None] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (`prefix.py`)
    text: str = ""  # the output text, stop strings cut: set when the job is done
    decoding: object = None  # output processing's state (output.py), from the first token on
    submitted: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    def cancel(self) -> None:
        """The client went away: stop spending compute on it."""
        self.cancelled = True

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0
                    or self.logit_bias)
