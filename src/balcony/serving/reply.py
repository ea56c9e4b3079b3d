"""Answers in OpenAI's shapes: a completion object with n choices, or server-sent chunks ending in
[DONE] (and, with `stream_options.include_usage`, a last chunk carrying `usage` and no choices; with
vLLM's `continuous_usage_stats`, every chunk carries the usage so far).

Log-probabilities come in the route's own shape: completions' `tokens` / `token_logprobs` /
`top_logprobs` / `text_offset` lists (the prompt's tokens first with `echo`), chat's `content` list
of `{token, logprob, bytes, top_logprobs}`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable

from ..core.policy import FULL, label
from .job import Job


class ApiError(Exception):
    """An answer in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


class Reply:
    def __init__(self, jobs: list[Job], chat: bool, model_name: str, finished: Callable[[Job, dict], None], *,
                 decode: Callable[[list[int]], list[str]], echo: list[str] | None = None, include_usage: bool = False,
                 continuous_usage: bool = False, choices_per_prompt: int = 1):
        self.jobs, self.chat, self.model_name, self.finished = jobs, chat, model_name, finished
        self.decode, self.echo = decode, echo  # echo: per choice, its prompt's text
        self.per_prompt = choices_per_prompt
        self.include_usage, self.continuous_usage = include_usage or continuous_usage, continuous_usage
        self.sent = [0] * len(jobs)  # per choice: tokens streamed so far (continuous usage counts them)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"
        exit_layer = jobs[0].exit_layer
        self.exit_label = FULL if exit_layer is None else exit_layer
        self.headers = {"X-Balcony-Exit": label(exit_layer)}
        self.wants_logprobs = jobs[0].logprobs is not None
        self.cursor = [0] * len(jobs)  # per choice: tokens whose logprobs were sent
        self.offset = [0] * len(jobs)  # per choice: characters before its next token (text_offset)

    def usage(self, done: list[dict] | None = None) -> dict:
        """Counts of the finished choices `done`, or (None) of the tokens streamed so far."""
        prompt = sum(len(job.prompt_ids) for job in self.jobs[::self.per_prompt])  # each prompt once, not n times
        cached = sum(job.cached_tokens for job in self.jobs[::self.per_prompt])
        completion = sum(self.sent) if done is None else sum(d["completion_tokens"] for d in done)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    # ----------------------------------------------------------------- log-probabilities

    def logprobs(self, index: int, upto: int, prompt: bool = False):
        """The logprobs object for choice `index`'s tokens from its cursor to `upto` (or its prompt)."""
        job = self.jobs[index]
        if not self.wants_logprobs:
            return None
        if prompt:
            ids, entries = job.prompt_ids, job.prompt_scores
        else:
            ids, entries = job.tokens[self.cursor[index]:upto], job.token_logprobs[self.cursor[index]:upto]
            self.cursor[index] = max(self.cursor[index], upto)
        candidates = sorted({t for entry in entries if entry for t, _ in entry[1]})
        names = dict(zip(candidates, self.decode(candidates)))
        tokens = self.decode(list(ids))
        if self.chat:
            return {"content": [self._chat_entry(token, entry, names) for token, entry in zip(tokens, entries)],
                    "refusal": None}
        offsets = []
        for token in tokens:
            offsets.append(self.offset[index])
            self.offset[index] += len(token)
        return {"tokens": tokens, "token_logprobs": [e[0] if e else None for e in entries],
                "top_logprobs": [{names[t]: lp for t, lp in e[1]} if e else None for e in entries],
                "text_offset": offsets}

    @staticmethod
    def _chat_entry(token: str, entry, names: dict) -> dict:
        top = [{"token": names[t], "logprob": lp, "bytes": list(names[t].encode())} for t, lp in entry[1]]
        return {"token": token, "logprob": entry[0], "bytes": list(token.encode()), "top_logprobs": top}

    # ----------------------------------------------------------------- one piece

    async def whole(self, events: asyncio.Queue):
        from fastapi.responses import JSONResponse

        done: dict[int, dict] = {}
        try:
            while len(done) < len(self.jobs):
                index, what, payload = await events.get()
                if what == "error":
                    raise ApiError(500, payload, "server_error")
                if what == "done":
                    done[index] = payload
                    self.finished(self.jobs[index], payload)
        finally:
            for job in self.jobs:
                job.cancel()  # a no-op when finished; frees the slots when the client left early
        choices = [self._choice(i, done[i]) for i in range(len(self.jobs))]
        return JSONResponse({"id": self.id, "object": self.kind, "created": self.created, "model": self.model_name,
                             "choices": choices, "usage": self.usage(list(done.values())),
                             "exit_layer": self.exit_label}, headers=self.headers)

    def _choice(self, index: int, done: dict) -> dict:
        job = self.jobs[index]
        if self.chat:
            choice = {"index": index, "message": {"role": "assistant", "content": job.text},
                      "logprobs": self.logprobs(index, len(job.tokens))}
        else:  # the echoed prompt's logprobs first: its text offsets come first too
            echoed = self.logprobs(index, 0, prompt=True) if self.echo is not None else None
            generated = self.logprobs(index, len(job.tokens))
            joined = {key: echoed[key] + generated[key] for key in echoed} if echoed and generated else generated
            choice = {"index": index, "text": (self.echo[index] if self.echo else "") + job.text, "logprobs": joined}
        choice["finish_reason"] = done["finish_reason"]
        return choice

    # ----------------------------------------------------------------- a stream

    def chunk(self, index: int, delta: str | None, reason: str | None, logprobs=None, first: bool = False) -> str:
        if self.chat:
            body = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
            choice = {"index": index, "delta": body, "logprobs": logprobs, "finish_reason": reason}
        else:
            choice = {"index": index, "text": delta or "", "logprobs": logprobs, "finish_reason": reason}
        return self._data([choice])

    def _data(self, choices: list, usage: dict | None = None) -> str:
        data = {"id": self.id, "object": self.kind + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model_name, "choices": choices, "exit_layer": self.exit_label}
        if self.include_usage:
            # null until the last chunk, as OpenAI sends it; with continuous usage, the counts so far
            data["usage"] = self.usage() if usage is None and self.continuous_usage else usage
        return f"data: {json.dumps(data)}\n\n"

    def opening(self, index: int) -> str | None:
        if self.chat:
            return self.chunk(index, None, None, first=True)
        if self.echo is not None:
            return self.chunk(index, self.echo[index], None, self.logprobs(index, 0, prompt=True))
        return None

    def stream(self, events: asyncio.Queue):
        from fastapi.responses import StreamingResponse

        async def sse():
            done: dict[int, dict] = {}
            try:
                for index in range(len(self.jobs)):
                    if (opening := self.opening(index)) is not None:
                        yield opening
                while len(done) < len(self.jobs):
                    index, what, payload = await events.get()
                    if what == "delta":
                        text, upto = payload
                        self.sent[index] = max(self.sent[index], upto)
                        yield self.chunk(index, text, None, self.logprobs(index, upto))
                    elif what == "error":
                        error = {"message": payload, "type": "server_error", "param": None, "code": None}
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        break
                    elif what == "done":
                        done[index] = payload
                        self.sent[index] = payload["completion_tokens"]
                        self.finished(self.jobs[index], payload)
                        yield self.chunk(index, None, payload["finish_reason"])
                if self.include_usage and len(done) == len(self.jobs):
                    yield self._data([], self.usage(list(done.values())))
                yield "data: [DONE]\n\n"
            finally:
                for job in self.jobs:
                    job.cancel()  # the client disconnected (or we are done): free the slots

        return StreamingResponse(sse(), media_type="text/event-stream", headers=self.headers)
