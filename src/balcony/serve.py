"""`balcony serve`: an OpenAI-compatible HTTP server with a per-request depth.

Routes: POST /v1/completions and /v1/chat/completions (streaming over SSE or not),
GET /v1/models, GET /health, GET /metrics (Prometheus). Each request may carry one of
`exit_layer`, `budget` (fraction of the full model's per-token cost) or `max_ms_per_token`;
without one, the engine's load-adaptive policy decides (the full model unless a
`--target-ms-per-token` is set). Every response names the exit that served it.
"""


import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

from .engine import Engine, Job, QueueFull
from .errors import BalconyError, ExitError
from .model import BalconyModel

API_KEY_ENV = "BALCONY_API_KEY"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8000
    api_key: str | None = None
    model_name: str = "balcony"
    aliases: tuple[str, ...] = ()  # other names accepted as `model` (e.g. the artifact it was started with)
    target_ms_per_token: float | None = None
    max_batch_size: int = 8
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 1024
    batch_window_ms: float = 5.0
    drain_seconds: float = 30.0  # how long SIGTERM waits for in-flight requests


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code


def create_app(model: BalconyModel, config: ServeConfig | None = None, *, calibrate: bool = True):
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

    config = config or ServeConfig()
    if model.tokenizer is None:
        raise BalconyError("serving text needs a tokenizer; save one beside the base model")
    engine = Engine(model, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                    target_ms_per_token=config.target_ms_per_token, batch_window_ms=config.batch_window_ms)

    registry = CollectorRegistry()
    requests_total = Counter("balcony_requests", "HTTP requests by route and status", ["route", "status"], registry=registry)
    by_exit = Counter("balcony_requests_by_exit", "Generation requests by the exit that served them", ["exit"],
                      registry=registry)
    tokens_total = Counter("balcony_generated_tokens", "Output tokens generated", registry=registry)
    prompt_tokens_total = Counter("balcony_prompt_tokens", "Prompt tokens read", registry=registry)
    latency = Histogram("balcony_request_latency_seconds", "Request latency, admission to last token", ["route"],
                        registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
    ttft = Histogram("balcony_time_to_first_token_seconds", "Admission to first output token", registry=registry,
                     buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    Gauge("balcony_load", "Requests queued or decoding", registry=registry).set_function(lambda: engine.load)

    # ------------------------------------------------------------- request bodies

    class Common(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str | None = None
        max_tokens: int | None = Field(default=None, ge=1)
        max_completion_tokens: int | None = Field(default=None, ge=1)
        temperature: float = Field(default=1.0, ge=0.0, le=2.0)
        top_p: float = Field(default=1.0, gt=0.0, le=1.0)
        n: int = Field(default=1, ge=1)
        stream: bool = False
        stop: str | list[str] | None = None
        seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # what torch's generators take
        user: str | None = None
        stream_options: dict | None = None
        # balcony's own: one of these picks the depth
        exit_layer: StrictInt | Literal["full"] | None = None  # strict: JSON true is not exit 1
        budget: float | None = Field(default=None, gt=0.0, le=1.0)
        max_ms_per_token: float | None = Field(default=None, gt=0.0)

    class CompletionBody(Common):
        # text, or token ids (OpenAI's API and vLLM take both); one prompt per request
        prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant", "tool", "developer"]
        content: str | list[dict] | None = None

    class ChatBody(Common):
        messages: list[Message] = Field(min_length=1)

    # ------------------------------------------------------------- app

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(engine.start, calibrate)
        yield
        # uvicorn has stopped accepting connections and waited for open ones; let the rest finish.
        await asyncio.to_thread(engine.stop, True, config.drain_seconds)

    app = FastAPI(title="balcony", lifespan=lifespan)
    app.state.engine = engine

    def error_response(err: ApiError):
        return JSONResponse({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}},
                            status_code=err.status)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route = request.url.path
        try:
            if route != "/health" and config.api_key is not None:
                given = request.headers.get("authorization", "")
                token = given[7:] if given.lower().startswith("bearer ") else ""
                if not hmac.compare_digest(token.encode(), config.api_key.encode()):
                    raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                   "authentication_error", code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
                raise ApiError(413, f"request body of {length} bytes is over the limit of {config.max_body_bytes}")
            response = await call_next(request)
        except ApiError as err:
            response = error_response(err)
        requests_total.labels(route, str(response.status_code)).inc()
        return response

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return error_response(err)

    @app.get("/health")
    async def health():
        return {"status": "ok", "load": engine.load}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry).decode(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "balcony",
            "base": model.balcony_config.base_model, "exits": model.exits, "num_layers": model.num_layers,
        }]}

    async def parse(request: Request, schema):
        raw = await request.body()
        if len(raw) > config.max_body_bytes:
            raise ApiError(413, f"request body of {len(raw)} bytes is over the limit of {config.max_body_bytes}")
        try:
            payload = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            body = schema.model_validate(payload)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
        if body.model not in (None, config.model_name, *config.aliases):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves {config.model_name!r} "
                           "(GET /v1/models)", param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, "n > 1 is not supported: send one request per completion", param="n")
        return body

    def pick_exit(body) -> tuple[int | None, bool]:
        chosen = [k for k in ("exit_layer", "budget", "max_ms_per_token") if getattr(body, k) is not None]
        if len(chosen) > 1:
            raise ApiError(400, f"give at most one of exit_layer, budget, max_ms_per_token (got {', '.join(chosen)})",
                           param=chosen[1])
        try:
            if body.exit_layer is not None:
                return model.check_exit(body.exit_layer), True
            if body.budget is not None:
                return model.choose_exit(budget=body.budget), True
            if body.max_ms_per_token is not None:
                return model.choose_exit(max_ms_per_token=body.max_ms_per_token), True
        except ExitError as err:
            raise ApiError(400, str(err), param=chosen[0]) from None
        return None, False  # the engine's load-adaptive policy decides when the batch forms

    def make_job(body, prompt_ids: list[int]) -> Job:
        if len(prompt_ids) > config.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, over the limit of {config.max_prompt_tokens}",
                           param="prompt")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        max_tokens = body.max_completion_tokens or body.max_tokens or 16
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {config.max_tokens_limit}",
                           param="max_tokens")
        exit_layer, pinned = pick_exit(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Job(prompt_ids=prompt_ids, max_tokens=max_tokens, exit_layer=exit_layer, pinned=pinned,
                   temperature=body.temperature,
                   top_p=body.top_p, stop=[s for s in stop if s], seed=body.seed)

    async def run(job: Job, route: str, chat: bool, stream: bool):
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        try:
            engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, str(err), "rate_limit_error", code="queue_full") from None
        try:
            what, payload = await events.get()  # ("start", exit): the request's batch has formed
        except asyncio.CancelledError:
            job.cancel()
            raise
        exit_label = "full" if job.exit_layer is None else job.exit_layer
        by_exit.labels(str(exit_label)).inc()
        prompt_tokens_total.inc(len(job.prompt_ids))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def finish(done: dict):
            tokens_total.inc(done["completion_tokens"])
            latency.labels(route).observe(time.perf_counter() - job.submitted)
            if job.first_token_at is not None:
                ttft.observe(job.first_token_at - job.submitted)
            return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": done["completion_tokens"],
                    "total_tokens": len(job.prompt_ids) + done["completion_tokens"]}

        if not stream:
            try:
                while True:
                    what, payload = await events.get()
                    if what == "error":
                        raise ApiError(500, payload, "server_error")
                    if what == "done":
                        break
            finally:
                job.cancel()  # a no-op when finished; frees the slot when the client left early
            usage = finish(payload)
            choice = ({"index": 0, "message": {"role": "assistant", "content": job.text}} if chat
                      else {"index": 0, "text": job.text, "logprobs": None})
            choice["finish_reason"] = payload["finish_reason"]
            return JSONResponse({"id": rid, "object": kind, "created": created, "model": config.model_name,
                                 "choices": [choice], "usage": usage, "exit_layer": exit_label},
                                headers={"X-Balcony-Exit": str(exit_label)})

        def chunk(delta: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                body = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": body, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
            data = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created,
                    "model": config.model_name, "choices": [choice], "exit_layer": exit_label}
            return f"data: {json.dumps(data)}\n\n"

        async def sse():
            try:
                if chat:
                    yield chunk(None, None, first=True)
                while True:
                    what, payload = await events.get()
                    if what == "delta":
                        yield chunk(payload, None)
                    elif what == "error":
                        yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        finish(payload)
                        yield chunk(None, payload["finish_reason"])
                        break
                yield "data: [DONE]\n\n"
            finally:
                job.cancel()  # the client disconnected (or we are done): free the slot

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"X-Balcony-Exit": str(exit_label)})

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(request, CompletionBody)
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]  # one text, or one list of token ids
        if len(prompt) != 1:
            raise ApiError(400, "send exactly one prompt per request", param="prompt")
        if isinstance(prompt[0], str):
            with engine.tokenizer_lock:
                ids = model.tokenizer(prompt[0], add_special_tokens=True)["input_ids"]
        else:
            ids = list(prompt[0])
            vocab = model.base.config.vocab_size
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return await run(make_job(body, ids), "/v1/completions", chat=False, stream=body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(request, ChatBody)
        if getattr(model.tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(
                part.get("text", "") for part in m.content if isinstance(part, dict))
            messages.append({"role": m.role, "content": content or ""})
        with engine.tokenizer_lock:
            ids = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                      return_dict=True)
        return await run(make_job(body, list(ids["input_ids"])), "/v1/chat/completions", chat=True, stream=body.stream)

    return app


def serve(model: BalconyModel, config: ServeConfig) -> None:
    """Run the server until SIGINT/SIGTERM, then drain in-flight requests and exit."""
    import uvicorn

    app = create_app(model, config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info",
                timeout_graceful_shutdown=int(config.drain_seconds))


class BackgroundServer:
    """`app` on a free loopback port in a daemon thread, for tests and benchmarks; `close()` stops it."""

    def __init__(self, app, host: str = "127.0.0.1", timeout: float = 120.0):
        import uvicorn

        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise BalconyError(f"the server on {host} did not start")
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]  # port 0: the OS picked one
        self.url = f"http://{host}:{port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def api_key_from_env() -> str | None:
    return os.environ.get(API_KEY_ENV) or None
