"""The serving engine: one worker thread, continuous batching, rows at any exits in one batch.

The scheduler (`Engine._loop`) admits waiting requests at every decode step, up to
`max_batch_size` rows and `prefill_tokens` prompt tokens: newcomers are prefilled together (a
longer prompt in chunks, one per step) and join the running batch, finished or cancelled rows
leave it, so a request waits one step, not one batch, and running requests keep streaming
while a long prompt is read. The model runner
(`runner.MixedRunner`) runs rows at different exits in one batch: the trunk is shared, each row
leaves through its own balcony and the shared head. Sampling (`sampler.py`) and output
processing (`output.py`) turn logits into tokens and text deltas. Requests that did not pin an
exit get one when admitted, from the load-adaptive policy: the deepest exit whose predicted
milliseconds per output token, at the current load, stay within the target (and not shallower
than the quality floor). Bases with sliding-window layers, whose caches cannot be joined, are served in
per-exit batches decoded to their end instead.

The engine knows nothing of HTTP; `api.py` turns requests into `Job`s and streams events.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from ..core.errors import BalconyError
from ..core.exits import can_join_rows, left_pad, positions_from_mask
from ..core.model import BalconyModel
from .job import Job
from .output import Output
from .runner import MixedRunner, Prefill, Rows
from .sampler import pick, prompt_scores

__all__ = ["Engine", "Job", "QueueFull"]


class QueueFull(BalconyError):
    """More requests are waiting or running than the engine admits (HTTP 429)."""


def _generators(jobs: list[Job]) -> list[torch.Generator | None]:
    """Each seeded request's own sampling generator (None: the global one)."""
    return [None if j.seed is None else torch.Generator(device="cpu").manual_seed(j.seed) for j in jobs]


@dataclass
class _Batch:
    """The running batch: the runner's rows, their jobs and generators, each row's pending token."""

    rows: Rows
    jobs: list
    generators: list
    pending: torch.Tensor


class Engine:
    def __init__(self, model: BalconyModel, *, max_batch_size: int = 32, max_queue: int = 64,
                 target_ms_per_token: float | None = None, batch_window_ms: float = 5.0, min_exit: int | str | None = None,
                 prefill_tokens: int = 1024):
        if max_batch_size < 1 or max_queue < 1 or prefill_tokens < 1:
            raise BalconyError("max_batch_size, max_queue and prefill_tokens must be at least 1")
        # prompt tokens (padded rows x columns) prefilled per scheduler step: newcomers beyond it
        # wait for the next step, a longer prompt is fed in chunks, decode steps run between
        self.prefill_tokens = prefill_tokens
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.target_ms_per_token = target_ms_per_token
        # the shallowest exit the load-adaptive policy may choose ("full": never shallower than full)
        self.min_exit = model.policy.check_exit(min_exit) if min_exit is not None else None
        self.never_shallower = min_exit is not None and self.min_exit is None
        self.floor_conflicts = 0  # choices where the target asked for shallower than the floor allows
        self.batch_window = batch_window_ms / 1000
        eos = model.base.generation_config.eos_token_id if model.base.generation_config else None
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.append(self.tokenizer.eos_token_id)
        self.eos = set(eos)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else None
        self.pad = pad if pad is not None else (min(self.eos) if self.eos else 0)
        # Rust tokenizers refuse concurrent use from several threads ("Already borrowed"): the
        # HTTP side encodes while this engine decodes, so both go through this lock.
        self.tokenizer_lock = threading.Lock()
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # Calibrated at start: full-model decode-step milliseconds at batch 1 and at the largest
        # batch; then corrected by what the engine measures while serving.
        self._full_step_ms = {1: 1.0, max_batch_size: 1.0}
        self._correction: dict[int | None, float] = {}  # measured / predicted step time, per exit
        self.runner = MixedRunner(model) if can_join_rows(model.base.config) else None
        self.output = Output(self.tokenizer, self.tokenizer_lock, self.eos)

    # ----------------------------------------------------------------- life cycle

    def start(self, calibrate: bool = True) -> None:
        if calibrate:
            self._calibrate()
        self._thread = threading.Thread(target=self._loop, name="balcony-engine", daemon=True)
        self._thread.start()

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with `drain`, finish what is queued and running first."""
        with self._cond:
            if drain:
                self._cond.wait_for(lambda: not self._pending and not self._running, timeout=timeout)
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    @property
    def load(self) -> int:
        """Requests admitted and not yet finished (queued or decoding)."""
        with self._cond:
            return self._live()

    def _live(self) -> int:
        return sum(not j.cancelled for j in self._pending) + sum(not (j.cancelled or j.finished) for j in self._running)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._live() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already queued or running; retry shortly")
            self._pending.append(job)
            self._cond.notify_all()

    # ----------------------------------------------------------------- the load-adaptive policy

    def predicted_ms_per_token(self, exit_layer: int | None, load: int) -> float:
        """Milliseconds between a client's output tokens at `exit_layer` with `load` requests in the system.

        A batch decodes one token for each of its requests per step, so a client's token rate is
        the decode-step time at the batch size the load fills (time spent queued for a batch shows
        up in the time to first token, which `max_queue` bounds). The step time is interpolated
        between the calibrated batch 1 and largest batch, scaled by the exit's FLOP share and by
        how far measured scheduler iterations (a decode step and any prefill chunk run before it,
        which delays every running row's token too) have run from the prediction.
        """
        batch = max(1, min(load, self.max_batch_size))
        return self._full_step(batch) * self.model.costs.relative(exit_layer) * self._correction_for(exit_layer)

    def _full_step(self, batch: int) -> float:
        """The full model's decode-step milliseconds at this batch size: interpolated between the
        calibrated batch 1 and largest batch."""
        lo, hi = self._full_step_ms[1], self._full_step_ms[self.max_batch_size]
        return lo if self.max_batch_size == 1 else lo + (hi - lo) * (batch - 1) / (self.max_batch_size - 1)

    def _correction_for(self, exit_layer: int | None) -> float:
        if exit_layer in self._correction:
            return self._correction[exit_layer]
        seen = list(self._correction.values())  # an exit not served yet: as the others run
        return sum(seen) / len(seen) if seen else 1.0

    def adaptive_exit(self, load: int | None = None) -> int | None:
        """The deepest exit (None: full) that holds the target at this load; the full model without a target."""
        if self.target_ms_per_token is None:
            return None
        load = self.load + 1 if load is None else load
        # 10% headroom: the prediction is a mean, and a batch that misses runs to its end
        limit = 0.9 * self.target_ms_per_token
        predicted = lambda e: self.predicted_ms_per_token(e, load)  # noqa: E731
        if self.never_shallower:
            choice = None
        else:
            choice = self.model.policy.deepest_within(predicted, limit, floor=self.min_exit)
        if predicted(choice) > limit and self.model.policy.deepest_within(predicted, limit) != choice:
            self.floor_conflicts += 1  # the floor held where the target alone would have gone shallower
        return choice

    def _calibrate(self) -> None:
        """Time a few decode steps of the full model, through the same path requests take
        (sampling, detokenizing), at batch 1 and at the largest batch, on a 64-token context."""
        vocab = self.model.base.config.vocab_size
        prompt = [3 + i % max(1, vocab - 3) for i in range(64)]  # ordinary tokens, not specials
        for size in sorted(self._full_step_ms):
            jobs = [Job(list(prompt), 5, None, ignore_eos=True) for _ in range(size)]
            steps = self._decode(jobs, None, record=False) if self.runner is None else self._time_steps(jobs)
            self._full_step_ms[size] = sorted(steps)[len(steps) // 2]

    @torch.no_grad()
    def _time_steps(self, jobs: list[Job]) -> list[float]:
        rows, logits = self.runner.prefill([j.prompt_ids for j in jobs], [None] * len(jobs), self.pad)
        steps = []
        for _ in range(jobs[0].max_tokens):
            start = time.perf_counter()
            tokens = self._pick(logits.float(), jobs, [None] * len(jobs))
            logits = self.runner.step(rows, tokens)
            steps.append((time.perf_counter() - start) * 1000)
        return steps

    # ----------------------------------------------------------------- the worker

    def _loop(self) -> None:
        if self.runner is None:
            return self._loop_batches()
        batch = self._empty_batch()
        filling: tuple[list[Job], Prefill] | None = None  # newcomers whose prefill is under way
        while True:
            with self._cond:
                if not batch.jobs and filling is None:
                    self._cond.wait_for(lambda: self._pending or self._stopping)
                    if self._stopping and not self._pending:
                        return
                    idle = True
                else:
                    idle = False
            if idle:
                time.sleep(self.batch_window)  # let requests that arrive together share one prefill
            if filling is None:
                newcomers = self._score(self._admit(len(batch.jobs)))
                filling = (newcomers, self._start_prefill(newcomers)) if newcomers else None
            started = time.perf_counter()
            try:
                if filling is not None and self._prefill(batch, *filling):
                    filling = None
                if batch.jobs:
                    self._step(batch, started)
            except Exception as err:  # a failed step must not kill the server: fail its requests
                for job in batch.jobs + (filling[0] if filling else []):
                    if not job.finished:
                        job.finished = True
                        job.emit("error", f"generation failed: {type(err).__name__}: {err}")
                batch = self._empty_batch()
                filling = None
            with self._cond:  # a prompt still being prefilled is running too (load, 429, drain)
                self._running = list(batch.jobs) + (filling[0] if filling else [])
                self._cond.notify_all()

    def _empty_batch(self) -> _Batch:
        return _Batch(self.runner.empty(), [], [], torch.zeros(0, dtype=torch.long, device=self.model.device))

    def _admit(self, running: int) -> list[Job]:
        """The oldest waiting requests that fit in the batch and, left-padded together, in the prefill
        budget (the oldest one always: a longer prompt is fed in chunks); unpinned ones get their exit now."""
        with self._cond:
            self._pending = [j for j in self._pending if not j.cancelled]
            newcomers, width = [], 0
            for job in self._pending[: max(0, self.max_batch_size - running)]:
                width = max(width, len(job.prompt_ids))
                if newcomers and width * (len(newcomers) + 1) > self.prefill_tokens:
                    break
                newcomers.append(job)
            self._pending = self._pending[len(newcomers):]
            self._running = self._running + newcomers
            for job in newcomers:
                if not job.pinned:
                    job.exit_layer = self.adaptive_exit(load=self._live())
        return newcomers

    def _start_prefill(self, newcomers: list[Job]) -> Prefill:
        columns = max(1, self.prefill_tokens // len(newcomers))  # a prompt shorter than that goes in one
        return Prefill(self.runner, [j.prompt_ids for j in newcomers], [j.exit_layer for j in newcomers], self.pad, columns)

    def _prefill(self, batch: _Batch, newcomers: list[Job], filling: Prefill) -> bool:
        """Feed the newcomers' next prompt chunk; after the last one, emit their first tokens, join the
        live ones to the batch and return True."""
        logits = filling.advance()
        if logits is None:
            return False
        rows = filling.rows
        generators = _generators(newcomers)
        for job in newcomers:
            job.emit("start", job.exit_layer)
        first = self._pick(logits.float(), newcomers, generators)
        alive = [i for i, j in enumerate(newcomers) if not (j.finished or j.cancelled)]
        if alive:
            self.runner.keep(rows, alive)
            self.runner.join(batch.rows, rows)
            batch.jobs += [newcomers[i] for i in alive]
            batch.generators += [generators[i] for i in alive]
            batch.pending = torch.cat([batch.pending, first[alive].to(batch.pending.device)])
        return True

    def _step(self, batch: _Batch, started: float) -> None:
        """One decode step for every row; rows that finished or whose client left leave the batch.
        `started`: when this scheduler iteration began; a prefill chunk run before the step delays
        every row's token too, so the policy learns from the whole iteration."""
        logits = self.runner.step(batch.rows, batch.pending)
        tokens = self._pick(logits.float(), batch.jobs, batch.generators)
        self._observe(batch.rows.exits, (time.perf_counter() - started) * 1000)
        batch.pending = tokens
        alive = [i for i, j in enumerate(batch.jobs) if not (j.finished or j.cancelled)]
        if len(alive) < len(batch.jobs):
            self.runner.keep(batch.rows, alive)
            batch.jobs = [batch.jobs[i] for i in alive]
            batch.generators = [batch.generators[i] for i in alive]
            batch.pending = batch.pending[alive]

    def _observe(self, exits: list[int | None], ms: float) -> None:
        """A step of rows at these exits costs about the full model's step at this batch size times
        the rows' mean relative cost; each exit present is corrected by how far the step ran from that."""
        predicted = self._full_step(len(exits)) * sum(self.model.costs.relative(e) for e in exits) / len(exits)
        for e in set(exits):
            correction = self._correction_for(e)
            self._correction[e] = 0.8 * correction + 0.2 * (ms / predicted)

    def _loop_batches(self) -> None:
        """Per-exit batches decoded to their end: for bases whose caches cannot be joined."""
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                if self._stopping and not self._pending:
                    return
            time.sleep(self.batch_window)  # let requests that arrive together share a batch
            with self._cond:
                self._pending = [j for j in self._pending if not j.cancelled]
                if not self._pending:
                    continue
                # The oldest request goes first. Unpinned requests get their exit now, from the
                # load at this moment and the step times measured so far, and share one batch.
                choice = self.adaptive_exit(load=self._live())
                head = self._pending[0]
                exit_layer = head.exit_layer if head.pinned else choice
                batch = [j for j in self._pending if (j.pinned and j.exit_layer == exit_layer)
                         or (not j.pinned and exit_layer == choice)][: self.max_batch_size]
                self._pending = [j for j in self._pending if j not in batch]
                self._running = batch
            for job in batch:
                job.exit_layer = exit_layer
            batch = self._score(batch)
            for job in batch:
                job.emit("start", exit_layer)
            try:
                if batch:
                    self._decode(batch, exit_layer)
            except Exception as err:  # a failed batch must not kill the server: fail its requests
                for job in batch:
                    if not job.finished:
                        job.finished = True
                        job.emit("error", f"generation failed: {type(err).__name__}: {err}")
            finally:
                with self._cond:
                    self._running = []
                    self._cond.notify_all()

    @torch.no_grad()
    def _decode(self, jobs: list[Job], exit_layer: int | None, record: bool = True) -> list[float]:
        """Decode one batch to the end; returns the milliseconds of each step after the first."""
        device = self.model.device
        ids, mask = left_pad([j.prompt_ids for j in jobs], self.pad, device)
        generators = _generators(jobs)
        steps: list[float] = []
        sub = self.model.exit_model(exit_layer)
        out = sub(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=True)
        cache, logits = out.cache, out.logits[:, -1, :]
        for _ in range(max(j.max_tokens for j in jobs)):
            step_start = time.perf_counter()
            next_ids = self._pick(logits.float(), jobs, generators)
            if all(j.finished or j.cancelled for j in jobs):
                break
            mask = torch.cat([mask, mask.new_ones(len(jobs), 1)], dim=1)
            logits = sub(input_ids=next_ids[:, None].to(device), attention_mask=mask, cache=cache, use_cache=True,
                         position_ids=mask.sum(-1, keepdim=True) - 1).logits[:, -1, :]
            steps.append((time.perf_counter() - step_start) * 1000)
            if record:
                self._observe([exit_layer] * len(jobs), steps[-1])
        return steps

    def _pick(self, logits: torch.Tensor, jobs: list[Job], generators: list) -> torch.Tensor:
        """Sample each row's next token and hand it to output processing (rows still live)."""
        tokens, entries = pick(logits, jobs, generators, self.eos)
        for job, token, entry in zip(jobs, tokens.tolist(), entries):
            if not (job.finished or job.cancelled):
                self.output.advance(job, token, entry)
        return tokens

    def _score(self, jobs: list[Job]) -> list[Job]:
        """Score the prompts of the jobs that asked (echo); those asking no new token are done now.
        Returns the jobs left to generate."""
        left = []
        for job in jobs:
            try:
                if job.prompt_logprobs and not job.cancelled:
                    job.prompt_scores = prompt_scores(self.model, job)
            except Exception as err:  # a failed request must not kill the server
                job.finished = True
                job.emit("error", f"scoring the prompt failed: {type(err).__name__}: {err}")
                continue
            if job.max_tokens > 0:
                left.append(job)
            else:
                job.emit("start", job.exit_layer)
                self.output.finish(job, "length")
        return left
