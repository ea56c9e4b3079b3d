"""The scheduler: the queue of waiting requests, their admission into the running batch, and the
load-adaptive depth policy with its quality floor.

Requests wait in arrival order, at most `max_queue` queued or running (then `submit` raises
`QueueFull`: HTTP 429). At every engine step `admit` hands over the oldest ones that fit: for a
batch that mixes exits, as many as the batch has room for and, left-padded together, the prefill
budget (the oldest one always: a longer prompt is fed in chunks); for per-exit batches, those at
the oldest request's exit. With `max_waiting_steps` or `max_waiting_ms` > 0, newcomers join rows
that are decoding in groups, as in Hugging Face's text-generation-inference: once they number
`waiting_served_ratio` times the decoding rows, or once held that many decode steps, or once the
oldest has waited that long (a bound on the first token's delay whatever a step costs). Every
join stalls the decoding rows for a prompt pass, whose fixed cost (reading every weight once) a
group pays once; and under a steady load the groups merge and keep together, so each stream's
prompt pass falls before its own first token rather than between the tokens of the others: lower
inter-token latency for a later first token. The default (0) admits newcomers at every step.

Requests that did not pin an exit get one when admitted, from the load-adaptive policy: the
deepest exit whose predicted milliseconds per output token, at the current load, stay within the
target, and not shallower than the quality floor.
"""

from __future__ import annotations

import threading
import time

from ..core.errors import BalconyError
from ..core.model import BalconyModel
from .job import Job


class QueueFull(BalconyError):
    """More requests are waiting or running than the engine admits (HTTP 429)."""


class Scheduler:
    def __init__(self, model: BalconyModel, *, max_batch_size: int = 32, max_queue: int = 64,
                 target_ms_per_token: float | None = None, min_exit: int | str | None = None,
                 prefill_tokens: int = 1024, waiting_served_ratio: float = 1.5, max_waiting_steps: int = 0,
                 max_waiting_ms: float = 0.0):
        if max_batch_size < 1 or max_queue < 1 or prefill_tokens < 1:
            raise BalconyError("max_batch_size, max_queue and prefill_tokens must be at least 1")
        if waiting_served_ratio < 0 or max_waiting_steps < 0 or max_waiting_ms < 0:
            raise BalconyError("waiting_served_ratio, max_waiting_steps and max_waiting_ms must be at least 0 "
                               "(max_waiting_steps and max_waiting_ms both 0: newcomers join at every step)")
        self.model = model
        self.max_batch_size, self.max_queue = max_batch_size, max_queue
        # prompt tokens (padded rows x columns) prefilled per engine step: newcomers beyond it wait
        # for the next step, a longer prompt is fed in chunks, decode steps run between
        self.prefill_tokens = prefill_tokens
        # newcomers join a decoding batch once there are this many per decoding row, or once held this
        # many decode steps, or once the oldest has waited this long (a bound of 0 does not apply)
        self.waiting_served_ratio, self.max_waiting_steps = waiting_served_ratio, max_waiting_steps
        self.max_waiting_ms = max_waiting_ms
        self.held_steps = 0  # decode steps the waiting requests have been held since newcomers last joined
        self.target_ms_per_token = target_ms_per_token
        # the shallowest exit the load-adaptive policy may choose ("full": never shallower than full)
        self.min_exit = model.policy.check_exit(min_exit) if min_exit is not None else None
        self.never_shallower = min_exit is not None and self.min_exit is None
        self.floor_conflicts = 0  # choices where the target asked for shallower than the floor allows
        # Calibrated at start: full-model decode-step milliseconds at batch 1 and at the largest
        # batch; then corrected by what the engine measures while serving.
        self.full_step_ms = {1: 1.0, max_batch_size: 1.0}
        self._correction: dict[int | None, float] = {}  # measured / predicted step time, per exit
        self._pending: list[Job] = []
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False

    # ----------------------------------------------------------------- the queue

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if self._live() >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are already queued or running; retry shortly")
            self._pending.append(job)
            self._cond.notify_all()

    @property
    def load(self) -> int:
        """Requests admitted and not yet finished (queued or decoding)."""
        with self._cond:
            return self._live()

    def _live(self) -> int:
        return sum(not j.cancelled for j in self._pending) + sum(not (j.cancelled or j.finished) for j in self._running)

    def slots(self) -> dict[str, int]:
        """Requests held: queued, and in the running batch (cancelled ones included until they leave it)."""
        with self._cond:
            return {"queued": len(self._pending), "running": len(self._running)}

    def wait_for_work(self) -> bool:
        """Block until a request waits; False once stopping with none left."""
        with self._cond:
            self._cond.wait_for(lambda: self._pending or self._stopping)
            return bool(self._pending)

    def running(self, jobs: list[Job]) -> None:
        """The jobs the running batch holds now (load, 429, drain count them)."""
        with self._cond:
            self._running = list(jobs)
            self._cond.notify_all()

    def close(self, drain: bool = True, timeout: float | None = None) -> None:
        """Take no more requests; with `drain`, first wait until those queued and running are done."""
        with self._cond:
            if drain:
                self._cond.wait_for(lambda: not self._pending and not self._running, timeout=timeout)
            self._stopping = True
            self._cond.notify_all()

    def admit(self, room: int, one_exit: bool = False, decoding: int = 0) -> list[Job]:
        """The waiting requests that join the running batch now, at most `room`; with `one_exit`,
        only those at the oldest one's exit (a batch that cannot mix exits). With `decoding` rows
        running, none until enough wait or they have been held long enough (called once a step)."""
        with self._cond:
            self._pending = [j for j in self._pending if not j.cancelled]
            if not self._pending:
                self.held_steps = 0
                return []
            if decoding and not self._join_now(decoding):
                self.held_steps += 1
                return []
            self.held_steps = 0
            chosen = self._one_exit(room) if one_exit else self._fitting(room)
            taken = {id(j) for j in chosen}
            self._pending = [j for j in self._pending if id(j) not in taken]
            self._running = self._running + chosen
            if not one_exit:
                for job in chosen:
                    if not job.pinned:
                        job.exit_layer = self.adaptive_exit(load=self._live())
        return chosen

    def _join_now(self, decoding: int) -> bool:
        """Whether the waiting requests join a batch with `decoding` rows running now."""
        steps, ms = self.max_waiting_steps, self.max_waiting_ms
        return (not (steps or ms) or len(self._pending) >= int(self.waiting_served_ratio * decoding)
                or bool(steps) and self.held_steps >= steps
                or bool(ms) and (time.perf_counter() - self._pending[0].submitted) * 1000 >= ms)

    def _fitting(self, room: int) -> list[Job]:
        """The oldest requests that fit in `room` rows and, left-padded together, the prefill budget."""
        chosen, width = [], 0
        for job in self._pending[: max(0, room)]:
            width = max(width, len(job.prompt_ids))
            if chosen and width * (len(chosen) + 1) > self.prefill_tokens:
                break
            chosen.append(job)
        return chosen

    def _one_exit(self, room: int) -> list[Job]:
        """The oldest request and those sharing its exit: unpinned ones all get the policy's choice now."""
        if not self._pending:
            return []
        choice = self.adaptive_exit(load=self._live())
        head = self._pending[0]
        exit_layer = head.exit_layer if head.pinned else choice
        chosen = [j for j in self._pending if (j.pinned and j.exit_layer == exit_layer)
                  or (not j.pinned and exit_layer == choice)][:room]
        for job in chosen:
            job.exit_layer = exit_layer
        return chosen

    # ----------------------------------------------------------------- the load-adaptive policy

    def predicted_ms_per_token(self, exit_layer: int | None, load: int) -> float:
        """Milliseconds between a client's output tokens at `exit_layer` with `load` requests in the system.

        A batch decodes one token for each of its requests per step, so a client's token rate is
        the decode-step time at the batch size the load fills (time spent queued for a batch shows
        up in the time to first token, which `max_queue` bounds). The step time is interpolated
        between the calibrated batch 1 and largest batch, scaled by the exit's FLOP share and by
        how far measured engine steps (a decode step and any prefill chunk run before it, which
        delays every running row's token too) have run from the prediction.
        """
        batch = max(1, min(load, self.max_batch_size))
        return self._full_step(batch) * self.model.costs.relative(exit_layer) * self._correction_for(exit_layer)

    def _full_step(self, batch: int) -> float:
        """The full model's decode-step milliseconds at this batch size: interpolated between the
        calibrated batch 1 and largest batch."""
        lo, hi = self.full_step_ms[1], self.full_step_ms[self.max_batch_size]
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

        def predicted(exit_layer: int | None) -> float:
            return self.predicted_ms_per_token(exit_layer, load)

        if self.never_shallower:
            choice = None
        else:
            choice = self.model.policy.deepest_within(predicted, limit, floor=self.min_exit)
        if predicted(choice) > limit and self.model.policy.deepest_within(predicted, limit) != choice:
            self.floor_conflicts += 1  # the floor held where the target alone would have gone shallower
        return choice

    def observe(self, exits: list[int | None], ms: float) -> None:
        """A step of rows at these exits costs about the full model's step at this batch size times
        the rows' mean relative cost; each exit present is corrected by how far the step ran from that."""
        predicted = self._full_step(len(exits)) * sum(self.model.costs.relative(e) for e in exits) / len(exits)
        for e in set(exits):
            correction = self._correction_for(e)
            self._correction[e] = 0.8 * correction + 0.2 * (ms / predicted)
