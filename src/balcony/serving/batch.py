"""The running batch, behind one interface whichever model runner serves it.

The engine's loop asks a batch for its `room`, `add`s the requests the scheduler admits, and calls
`step(sample)` once per iteration: the batch runs its model forward, hands the logits to `sample`
(sampling and output processing, which return the next tokens), and drops the rows whose request
finished or whose client left. Two kinds:

- `MixedBatch` (continuous batching, over `runner.MixedRunner`): rows at any exits in one batch;
  newcomers join at any step, prefilled together in chunks of `prefill_tokens` with a decode step
  of the running rows after each chunk, so a long prompt does not stall them; the prompt
  beginnings they share with earlier requests come from the runner's prefix cache (`prefix.py`).
- `ExitBatch`, for bases whose caches cannot be joined (sliding-window layers): one batch at one
  exit, run through that exit's own model (`BalconyModel.exit_model`) and decoded to its end
  before the next one forms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from ..core.exits import left_pad, positions_from_mask
from ..core.kernels import torch_threads
from ..core.model import BalconyModel
from .job import Job
from .runner import MixedRunner, Prefill
from .sampler import generators

# sample(jobs, logits [rows, vocab], generators) -> each row's next token [rows]
Sample = Callable[[list[Job], torch.Tensor, list], torch.Tensor]


@dataclass
class Step:
    """What one step ran: whether prompt tokens were prefilled, and the exits of the rows it decoded."""

    prefilled: bool = False
    decoded: list[int | None] = field(default_factory=list)


class Batch(Protocol):
    mixes_exits: bool  # whether requests at different exits share it (else the scheduler admits one exit)

    @property
    def jobs(self) -> list[Job]: ...  # every request it holds, being prefilled or decoding

    def room(self) -> int: ...  # how many newcomers it takes now

    def add(self, jobs: list[Job]) -> None: ...

    def step(self, sample: Sample) -> Step: ...

    def clear(self) -> list[Job]: ...  # drop everything (after a failed step); returns what it held


def _live(jobs: list[Job]) -> list[int]:
    return [i for i, j in enumerate(jobs) if not (j.finished or j.cancelled)]


class MixedBatch:
    mixes_exits = True

    def __init__(self, model: BalconyModel, max_batch_size: int, prefill_tokens: int, pad: int,
                 prefill_threads: int | None = None, batch_threads: int | None = None, compile: bool = False,
                 prefix_cache_bytes: int = 0):
        self.runner = MixedRunner(model, compile, prefix_cache_bytes)
        self.max_batch_size, self.prefill_tokens, self.pad = max_batch_size, prefill_tokens, pad
        # torch threads of prompt chunks and of decode steps of several rows (None: a lone row's)
        self.prefill_threads, self.batch_threads = prefill_threads, batch_threads
        self._reset()

    @property
    def jobs(self) -> list[Job]:
        return self.running + self.newcomers

    def room(self) -> int:
        return 0 if self.filling is not None else self.max_batch_size - len(self.running)

    def add(self, jobs: list[Job]) -> None:
        columns = max(1, self.prefill_tokens // len(jobs))  # a prompt shorter than that goes in one
        self.filling = Prefill(self.runner, [j.prompt_ids for j in jobs], [j.exit_layer for j in jobs], self.pad,
                               columns)
        for job in jobs:
            job.cached_tokens = self.filling.cached
        self.newcomers = jobs

    def clear(self) -> list[Job]:
        held = self.jobs
        self._reset()
        return held

    def _reset(self) -> None:
        self.rows = self.runner.empty()
        self.running: list[Job] = []
        self.generators: list = []
        self.pending = torch.zeros(0, dtype=torch.long, device=self.runner.model.device)  # each row's next input
        self.filling: Prefill | None = None
        self.newcomers: list[Job] = []

    def step(self, sample: Sample) -> Step:
        """The newcomers' next prompt chunk (if any), then one decode step for every running row; a step's
        time includes the chunk because it delays every running row's token too."""
        step = Step(prefilled=self.filling is not None)
        if self.filling is not None:
            with torch_threads(self.prefill_threads):
                self._prefill(sample)
        if self.running:
            step.decoded = list(self.rows.exits)
            with torch_threads(self.batch_threads if len(self.running) > 1 else None):
                logits = self.runner.step(self.rows, self.pending)
            self.pending = sample(self.running, logits.float(), self.generators)
            self._keep(_live(self.running))
        return step

    def _prefill(self, sample: Sample) -> None:
        """Feed the next chunk; after the last one, sample the newcomers' first tokens and join the live
        ones to the running rows."""
        logits = self.filling.advance()
        if logits is None:
            return
        rows, newcomers = self.filling.rows, self.newcomers
        self.filling, self.newcomers = None, []
        gens = generators(newcomers)
        for job in newcomers:
            job.emit("start", job.exit_layer)
        first = sample(newcomers, logits.float(), gens)
        alive = _live(newcomers)
        if alive:
            self.runner.keep(rows, alive)
            self.runner.join(self.rows, rows)
            self.running += [newcomers[i] for i in alive]
            self.generators += [gens[i] for i in alive]
            self.pending = torch.cat([self.pending, first[alive].to(self.pending.device)])

    def _keep(self, alive: list[int]) -> None:
        if len(alive) < len(self.running):
            self.runner.keep(self.rows, alive)
            self.running = [self.running[i] for i in alive]
            self.generators = [self.generators[i] for i in alive]
            self.pending = self.pending[alive]


class ExitBatch:
    mixes_exits = False

    def __init__(self, model: BalconyModel, max_batch_size: int, pad: int, prefill_threads: int | None = None,
                 batch_threads: int | None = None):
        self.model, self.max_batch_size, self.pad = model, max_batch_size, pad
        self.prefill_threads, self.batch_threads = prefill_threads, batch_threads
        self._reset()

    @property
    def jobs(self) -> list[Job]:
        return list(self.running)

    def room(self) -> int:
        return 0 if self.running else self.max_batch_size

    def add(self, jobs: list[Job]) -> None:
        self.running, self.generators = jobs, generators(jobs)
        self.sub = self.model.exit_model(jobs[0].exit_layer)

    def clear(self) -> list[Job]:
        held = self.jobs
        self._reset()
        return held

    def _reset(self) -> None:
        self.running: list[Job] = []
        self.generators: list = []
        self.sub = self.cache = self.mask = self.tokens = None

    @torch.no_grad()
    def step(self, sample: Sample) -> Step:
        """The whole prompt at the first step, one token per row after; every row stays to the end (the
        cache cannot drop rows), the batch ends when every request has."""
        device = self.model.device
        if self.cache is None:
            ids, self.mask = left_pad([j.prompt_ids for j in self.running], self.pad, device)
            with torch_threads(self.prefill_threads):
                out = self.sub(input_ids=ids, attention_mask=self.mask, position_ids=positions_from_mask(self.mask),
                               use_cache=True)
            for job in self.running:
                job.emit("start", job.exit_layer)
            step = Step(prefilled=True)
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.running), 1)], dim=1)
            with torch_threads(self.batch_threads if len(self.running) > 1 else None):
                out = self.sub(input_ids=self.tokens[:, None].to(device), attention_mask=self.mask, cache=self.cache,
                               use_cache=True, position_ids=self.mask.sum(-1, keepdim=True) - 1)
            step = Step(decoded=[self.running[0].exit_layer] * len(self.running))
        self.cache = out.cache
        self.tokens = sample(self.running, out.logits[:, -1, :].float(), self.generators)
        if not _live(self.running):
            self._reset()
        return step
