"""Output processing: a request's tokens become text, cut at its stop strings, sent as deltas.

Detokenizing is incremental, as vLLM's and TGI's are: each step decodes a short window of the
latest tokens, from a prefix offset (so that a tokenizer whose decoding depends on the token
before, like SentencePiece's leading space or a byte-fallback run, decodes them in context), and
takes the text past the window's part already read. Text is final, and sent, once no later token
can change it: a window whose text ends in an unfinished character ("\ufffd", bytes that do not
decode yet) waits for the next token, and anything that could start a stop string is held back
until it cannot. Stop strings are matched as the text arrives (one KMP automaton each), so each
step's work is bounded by the window and the new text, not by the length of the output.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .job import Job

# Tokens a window may wait on an unfinished character: UTF-8 needs at most 4 bytes, so text still
# unfinished after this many is bytes that will not decode; then all but its last character is sent
# and the window restarts on the last WINDOW_TAIL tokens (which hold any character still open).
MAX_PENDING = 12
WINDOW_TAIL = 6


class Detokenizer:
    """One request's tokens into final text, a few tokens decoded per step."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.prefix = 0  # the window decoded each step starts here
        self.read = 0  # the tokens before this one are in the text taken
        self.seen = 0  # characters of the window's text already taken

    def step(self, ids: list[int]) -> str:
        """The final text the tokens after the last call add ("" while a character is unfinished)."""
        text = self.decode(ids[self.prefix:])
        if not text.endswith("\ufffd"):
            new = text[self.seen:]
            self.prefix, self.read = self.read, len(ids)
            self.seen = len(self.decode(ids[self.prefix:self.read])) if self.prefix < self.read else 0
            return new
        if len(ids) - self.read <= MAX_PENDING:
            return ""
        new = text[self.seen:-1]
        self.prefix = self.read = max(0, len(ids) - WINDOW_TAIL)
        tail = self.decode(ids[self.prefix:])
        self.seen = len(tail) - tail.endswith("\ufffd")
        return new

    def flush(self, ids: list[int]) -> str:
        """The rest of the text, unfinished characters included: the request has ended."""
        return self.decode(ids[self.prefix:])[self.seen:]


def _failure(pattern: str) -> list[int]:
    """KMP's table: for each prefix of `pattern`, the length of its longest proper border."""
    table, k = [0] * len(pattern), 0
    for i in range(1, len(pattern)):
        while k and pattern[i] != pattern[k]:
            k = table[k - 1]
        k += pattern[i] == pattern[k]
        table[i] = k
    return table


class Stops:
    """Where the first stop string completes in text fed piece by piece, and how much of the text's
    end could still begin one (to hold back)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.tables = [_failure(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # per stop string: its longest prefix the text ends with

    @property
    def open(self) -> int:
        return max(self.matched, default=0)

    def feed(self, text: str) -> tuple[int, int] | None:
        """Feed `text`; the first stop string to complete in it, as (the index just past its end in
        `text`, its length), or None. At one character the longest completing wins: it starts first."""
        if not self.stops:
            return None
        for i, char in enumerate(text):
            done = 0
            for n, (stop, table) in enumerate(zip(self.stops, self.tables)):
                k = self.matched[n]
                while k and char != stop[k]:
                    k = table[k - 1]
                k += char == stop[k]
                if k == len(stop):
                    done, k = max(done, k), table[k - 1]
                self.matched[n] = k
            if done:
                return i + 1, done
        return None


@dataclass
class _Text:
    """Output processing's state for one request (kept on its `Job`)."""

    detokenizer: Detokenizer
    stops: Stops
    held: str = ""  # final text not sent yet: it could begin a stop string
    sent: list[str] = field(default_factory=list)
    covered: int = 0  # tokens the deltas sent so far cover
    stopped: bool = False


class Output:
    def __init__(self, tokenizer, lock: threading.Lock, eos: set[int]):
        self.tokenizer, self.lock, self.eos = tokenizer, lock, eos

    def _decode(self, ids: list[int]) -> str:
        with self.lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _state(self, job: Job) -> _Text:
        if job.decoding is None:
            job.decoding = _Text(Detokenizer(self._decode), Stops(job.stop))
        return job.decoding

    def advance(self, job: Job, token: int, score=None) -> None:
        """Take one sampled token (with its score when the request asked for logprobs)."""
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if token in self.eos and not job.ignore_eos:
            return self.finish(job, "stop")
        job.tokens.append(token)
        if score is not None:
            job.token_logprobs.append(score)
        state = self._state(job)
        if self._take(state, state.detokenizer.step(job.tokens)):
            return self.finish(job, "stop")
        if len(job.tokens) >= job.max_tokens:
            return self.finish(job, "length")
        keep = state.stops.open
        ready = state.held[: len(state.held) - keep]
        if ready:
            state.held = state.held[len(ready):]
            self._send(job, state, ready)

    @staticmethod
    def _take(state: _Text, text: str) -> bool:
        """Add final text; True when it completes a stop string (the text is cut where it begins)."""
        found = state.stops.feed(text)
        state.held += text
        if found is None:
            return False
        end, length = found
        cut = len(state.held) - len(text) + end - length
        state.held, state.stopped = state.held[:cut], True
        return True

    def _send(self, job: Job, state: _Text, text: str) -> None:
        state.sent.append(text)
        state.covered = len(job.tokens)
        job.emit("delta", (text, len(job.tokens)))

    def finish(self, job: Job, reason: str) -> None:
        state = self._state(job)
        if not state.stopped and self._take(state, state.detokenizer.flush(job.tokens)):
            reason = "stop"
        # the last delta also carries the logprobs of tokens whose text was empty or held back
        if state.held or (job.logprobs is not None and state.covered < len(job.tokens)):
            self._send(job, state, state.held)
            state.held = ""
        job.text = "".join(state.sent)
        job.finished = True
        job.emit("done", {"finish_reason": reason, "completion_tokens": len(job.tokens)})
