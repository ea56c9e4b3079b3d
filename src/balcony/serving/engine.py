"""The serving engine: one worker thread running one loop, in vLLM's shape.

Each iteration the scheduler (`scheduler.py`) admits waiting requests into the running batch, the
batch (`batch.py`) runs one step of its model runner (rows at any exits sharing the trunk through
`runner.MixedRunner`, or, for bases with sliding-window layers, per-exit batches through the
exit's own model), and the logits go to sampling (`sampler.py`) and output processing
(`output.py`: incremental detokenizing, stop strings, deltas), which stream each request's text
as it becomes final. A request waits one step, not one batch; the step times measured feed the
scheduler's load-adaptive policy.

The engine knows nothing of HTTP; `api.py` turns requests into `Job`s and streams events.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import torch

from ..core.errors import BalconyError
from ..core.exits import can_join_rows
from ..core.model import BalconyModel
from ..core.kernels import release_idle_threads
from . import runner
from .batch import Batch, ExitBatch, MixedBatch, Step
from .job import Job
from .output import Output
from .sampler import pick, prompt_scores
from .scheduler import QueueFull, Scheduler

__all__ = ["Engine", "Job", "QueueFull"]


class Engine:
    def __init__(self, model: BalconyModel, *, max_batch_size: int = 32, max_queue: int = 64,
                 target_ms_per_token: float | None = None, batch_window_ms: float = 5.0, min_exit: int | str | None = None,
                 prefill_tokens: int = 1024, waiting_served_ratio: float = 1.5, max_waiting_steps: int = 0,
                 max_waiting_ms: float = 0.0, threads: int | None = None, batch_threads: int | None = None,
                 compile: bool = False, prefix_cache_mb: float = 256):
        self.scheduler = Scheduler(model, max_batch_size=max_batch_size, max_queue=max_queue,
                                   target_ms_per_token=target_ms_per_token, min_exit=min_exit,
                                   prefill_tokens=prefill_tokens, waiting_served_ratio=waiting_served_ratio,
                                   max_waiting_steps=max_waiting_steps, max_waiting_ms=max_waiting_ms)
        self.model = model
        self.tokenizer = model.tokenizer
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
        # torch threads: a lone row's decode step, bound by streaming the weights from memory, takes every
        # core but one, as vLLM's CPU server leaves one to its HTTP side (on 2 cores, both cores read a
        # compiled lone step at 47 against 49 ms on average but varied more, and the load benchmark
        # read it no faster); decode steps of several rows and prompt chunks, where the arithmetic
        # grows with the rows, take them all, or `batch_threads` (on a machine whose cores other busy
        # processes share, a step on every core waits at each product for a thread that lost its core)
        cores = torch.get_num_threads()
        self.threads = threads or int(os.environ.get("BALCONY_ENGINE_THREADS", 0)) or max(1, cores - 1)
        self.batch_threads = batch_threads or max(cores, self.threads)
        joinable = can_join_rows(model.base.config)
        self.compiled = compile
        if compile and not joinable:
            raise BalconyError("compiled decode steps (--compile) need a base without sliding-window layers "
                               f"({type(model.base).__name__} has them): serve it without --compile")
        # prompt chunks and decode steps of several rows on the same count
        self.batch: Batch = (MixedBatch(model, max_batch_size, prefill_tokens, self.pad, self.batch_threads,
                                        self.batch_threads, compile, round(prefix_cache_mb * 2**20))
                             if joinable else ExitBatch(model, max_batch_size, self.pad, self.batch_threads,
                                                        self.batch_threads))
        self.output = Output(self.tokenizer, self.tokenizer_lock, self.eos)
        # called from the engine's thread after every step served: (what it ran, its seconds)
        self.on_step: Callable[[Step, float], None] | None = None
        self._thread: threading.Thread | None = None
        # the thread that builds the engine most often loaded the model, and its idle OpenMP team
        # slows every step of the engine's thread (`core.kernels.release_idle_threads`): start() lets
        # go of its caller's team, but the server calls start() from a worker thread. Measured in the
        # server (2 cores): decode steps of 8 rows 79 ms with this, 99 without.
        release_idle_threads()

    # ----------------------------------------------------------------- life cycle

    def start(self, calibrate: bool = True) -> None:
        """Start the engine's thread; with `calibrate`, return once it has timed its decode steps."""
        ready = threading.Event()
        failure: list[BaseException] = []
        release_idle_threads()  # this thread's OpenMP team: the engine's thread runs every product now
        self._thread = threading.Thread(target=self._run, args=(calibrate, ready, failure), name="balcony-engine",
                                        daemon=True)
        self._thread.start()
        ready.wait()
        if failure:
            raise failure[0]

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking work; with `drain`, finish what is queued and running first."""
        self.scheduler.close(drain, timeout)
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def submit(self, job: Job) -> None:
        self.scheduler.submit(job)

    @property
    def load(self) -> int:
        """Requests admitted and not yet finished (queued or decoding)."""
        return self.scheduler.load

    def _calibrate(self) -> None:
        """Time decode steps of the full model, through the same path requests take (sampling,
        detokenizing), at batch 1 and at the largest batch, on a 64-token context. The first steps of a
        lone row and of a batch compile their graphs (with compiled steps), here rather than under the
        first requests: where the largest batch is past the graphs' rows, 2 rows run too."""
        vocab = self.model.base.config.vocab_size
        prompt = [3 + i % max(1, vocab - 3) for i in range(64)]  # ordinary tokens, not specials
        timed = self.scheduler.full_step_ms
        largest = self.scheduler.max_batch_size
        graph_batch = (2,) if self.compiled and largest > runner.GRAPH_ROWS else ()
        for size in sorted({*timed, *graph_batch}):
            self.batch.add([Job(list(prompt), 7, None, ignore_eos=True) for _ in range(size)])
            steps = []
            while self.batch.jobs:
                started = time.perf_counter()
                step = self.batch.step(self._sample)
                if step.decoded and not step.prefilled:
                    steps.append((time.perf_counter() - started) * 1000)
            if size in timed:
                timed[size] = sorted(steps)[len(steps) // 2]

    # ----------------------------------------------------------------- the loop

    def _run(self, calibrate: bool, ready: threading.Event, failure: list) -> None:
        # every product of the engine runs on this thread, with its own torch threads (OpenMP's
        # setting is per thread, and one idle team too many halves a step's speed: `core.kernels`)
        torch.set_num_threads(self.threads)
        try:
            if calibrate:
                self._calibrate()
        except BaseException as err:  # noqa: BLE001 - handed to start(), which raises it
            failure.append(err)
            return
        finally:
            ready.set()
        self._loop()

    def _loop(self) -> None:
        while True:
            if not self.batch.jobs:
                if not self.scheduler.wait_for_work():
                    return
                time.sleep(self.batch_window)  # let requests that arrive together share one prefill
            room = self.batch.room()
            newcomers = self._score(self.scheduler.admit(room, one_exit=not self.batch.mixes_exits,
                                                         decoding=len(self.batch.jobs))) if room else []
            try:
                if newcomers:
                    self.batch.add(newcomers)
                if self.batch.jobs:
                    started = time.perf_counter()
                    step = self.batch.step(self._sample)
                    seconds = time.perf_counter() - started
                    if step.decoded:
                        self.scheduler.observe(step.decoded, seconds * 1000)
                    if self.on_step is not None:
                        self.on_step(step, seconds)
            except Exception as err:  # noqa: BLE001 - a failed step must not kill the server: fail its requests
                for job in [*newcomers, *self.batch.clear()]:
                    if not job.finished:
                        job.finished = True
                        job.emit("error", f"generation failed: {type(err).__name__}: {err}")
            self.scheduler.running(self.batch.jobs)

    def _sample(self, jobs: list[Job], logits: torch.Tensor, generators: list) -> torch.Tensor:
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
            except Exception as err:  # noqa: BLE001 - a failed request must not kill the server
                job.finished = True
                job.emit("error", f"scoring the prompt failed: {type(err).__name__}: {err}")
                continue
            if job.max_tokens > 0:
                left.append(job)
            else:
                job.emit("start", job.exit_layer)
                self.output.finish(job, "length")
        return left
