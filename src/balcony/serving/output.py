"""Output processing: a request's tokens become text, cut at its stop strings, sent as deltas.

Text is final, and sent, once no later token can change it: an unfinished character (a byte
sequence that does not decode yet) and anything that could start a stop string are held back.
"""

from __future__ import annotations

import threading
import time

from .job import Job


class Output:
    def __init__(self, tokenizer, lock: threading.Lock, eos: set[int]):
        self.tokenizer, self.lock, self.eos = tokenizer, lock, eos

    def advance(self, job: Job, token: int, score=None) -> None:
        """Take one sampled token (with its score when the request asked for logprobs)."""
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if token in self.eos and not job.ignore_eos:
            return self.finish(job, "stop")
        job.tokens.append(token)
        if score is not None:
            job.token_logprobs.append(score)
        with self.lock:
            text = self.tokenizer.decode(job.tokens, skip_special_tokens=True)
        for stop in job.stop:
            at = text.find(stop)
            if at >= 0:
                job.text = text[:at]
                return self.finish(job, "stop")
        job.text = text
        if len(job.tokens) >= job.max_tokens:
            return self.finish(job, "length")
        safe = len(text.rstrip("\ufffd"))
        for stop in job.stop:
            for k in range(min(len(stop) - 1, safe), 0, -1):
                if text[:safe].endswith(stop[:k]):
                    safe -= k
                    break
        if safe > job.sent:
            job.emit("delta", (text[job.sent:safe], len(job.tokens)))
            job.sent = safe

    def finish(self, job: Job, reason: str) -> None:
        if len(job.text) > job.sent:
            job.emit("delta", (job.text[job.sent:], len(job.tokens)))
            job.sent = len(job.text)
        job.finished = True
        job.emit("done", {"finish_reason": reason, "completion_tokens": len(job.tokens)})
