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

from ..core.errors import BalconyError, ExitError
from ..core.model import BalconyModel
from ..core.policy import FULL, DepthRequest, label
from .engine import Engine, Job, QueueFull

API_KEY_ENV = "BALCONY_API_KEY"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback unless the operator says otherwise
    port: int = 8000
    api_key: str | None = None
    model_name: str = "balcony"
    aliases: tuple[str, ...] = ()  # other names accepted as `model` (e.g. the artifact it was started with)
    target_ms_per_token: float | None = None
    min_exit: int | str | None = None  # quality floor: the shallowest exit the adaptive policy may pick ("full")
    max_batch_size: int = 32  # rows decoded together (continuous batching: requests join at any step)
    prefill_tokens: int = 1024  # prompt tokens prefilled per step, between decode steps (chunked when longer)
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


def _schemas():
    """The request bodies (pydantic is imported only when a server is made)."""
    from pydantic import BaseModel, ConfigDict, Field, StrictInt

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
        ignore_eos: bool = False  # vLLM's extension: generate max_tokens even past end-of-sequence (load tests)
        # balcony's own: one of these picks the depth
        exit_layer: StrictInt | Literal["full"] | None = None  # strict: JSON true is not exit 1
        budget: float | None = None  # (0, 1] and max_ms_per_token > 0: checked by the depth policy
        max_ms_per_token: float | None = None

    class CompletionBody(Common):
        # text, or token ids (OpenAI's API and vLLM take both); one prompt per request
        prompt: str | list[str] | list[StrictInt] | list[list[StrictInt]]

    class Message(BaseModel):
        model_config = ConfigDict(extra="allow")
        role: Literal["system", "user", "assistant", "tool", "developer"]
        content: str | list[dict] | None = None

    class ChatBody(Common):
        messages: list[Message] = Field(min_length=1)

    return CompletionBody, ChatBody


class _Metrics:
    """Prometheus counters and histograms of one server."""

    def __init__(self, engine: Engine):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry = CollectorRegistry()
        self.requests = Counter("balcony_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=registry)
        self.by_exit = Counter("balcony_requests_by_exit", "Generation requests by the exit that served them", ["exit"],
                               registry=registry)
        self.tokens = Counter("balcony_generated_tokens", "Output tokens generated", registry=registry)
        self.prompt_tokens = Counter("balcony_prompt_tokens", "Prompt tokens read", registry=registry)
        self.latency = Histogram("balcony_request_latency_seconds", "Request latency, admission to last token", ["route"],
                                 registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("balcony_time_to_first_token_seconds", "Admission to first output token",
                              registry=registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        Gauge("balcony_load", "Requests queued or decoding", registry=registry).set_function(lambda: engine.load)
        Gauge("balcony_quality_floor_conflicts", "Load-adaptive choices where the latency target asked for a "
              "shallower exit than the quality floor allows (the floor held)", registry=registry
              ).set_function(lambda: engine.floor_conflicts)

    def started(self, job: Job) -> None:
        self.by_exit.labels(label(job.exit_layer)).inc()
        self.prompt_tokens.inc(len(job.prompt_ids))

    def finished(self, job: Job, route: str, done: dict) -> dict:
        """Record a finished request; returns its OpenAI `usage`."""
        self.tokens.inc(done["completion_tokens"])
        self.latency.labels(route).observe(time.perf_counter() - job.submitted)
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.submitted)
        return {"prompt_tokens": len(job.prompt_ids), "completion_tokens": done["completion_tokens"],
                "total_tokens": len(job.prompt_ids) + done["completion_tokens"]}

    def exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


class _Api:
    """What the routes do: read and check a body, turn it into a `Job`, answer from the engine's events."""

    def __init__(self, model: BalconyModel, config: ServeConfig, engine: Engine, metrics: _Metrics):
        self.model, self.config, self.engine, self.metrics = model, config, engine, metrics
        self.completion_body, self.chat_body = _schemas()

    async def parse(self, request, schema):
        from pydantic import ValidationError

        raw = await request.body()
        config = self.config
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

    def pick_exit(self, body) -> tuple[int | None, bool]:
        """The exit a body asks for, and whether it asked (else the engine's load-adaptive policy decides)."""
        chosen = [k for k in ("exit_layer", "budget", "max_ms_per_token") if getattr(body, k) is not None]
        try:  # the one depth policy: refused here exactly as in the CLI and the Python API
            exit_layer = self.model.policy.resolve(DepthRequest(body.exit_layer, body.budget, body.max_ms_per_token))
        except ExitError as err:
            raise ApiError(400, str(err), param=chosen[-1] if chosen else None) from None
        return exit_layer, bool(chosen)

    def make_job(self, body, prompt_ids: list[int]) -> Job:
        config = self.config
        if len(prompt_ids) > config.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, over the limit of {config.max_prompt_tokens}",
                           param="prompt")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        max_tokens = body.max_completion_tokens or body.max_tokens or 16
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {config.max_tokens_limit}",
                           param="max_tokens")
        exit_layer, pinned = self.pick_exit(body)
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Job(prompt_ids=prompt_ids, max_tokens=max_tokens, exit_layer=exit_layer, pinned=pinned,
                   temperature=body.temperature, top_p=body.top_p, stop=[s for s in stop if s], seed=body.seed,
                   ignore_eos=body.ignore_eos)

    def completion_ids(self, body) -> list[int]:
        prompt = body.prompt
        if isinstance(prompt, str) or (prompt and all(isinstance(t, int) for t in prompt)):
            prompt = [prompt]  # one text, or one list of token ids
        if len(prompt) != 1:
            raise ApiError(400, "send exactly one prompt per request", param="prompt")
        if isinstance(prompt[0], str):
            with self.engine.tokenizer_lock:
                return self.model.tokenizer(prompt[0], add_special_tokens=True)["input_ids"]
        vocab = self.model.base.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt[0]):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt[0])

    def chat_ids(self, body) -> list[int]:
        tokenizer = self.model.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        messages = []
        for m in body.messages:
            content = m.content if isinstance(m.content, str) or m.content is None else "".join(
                part.get("text", "") for part in m.content if isinstance(part, dict))
            messages.append({"role": m.role, "content": content or ""})
        with self.engine.tokenizer_lock:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(ids["input_ids"])

    async def run(self, job: Job, route: str, chat: bool, stream: bool):
        """Submit the job, wait for its batch to form, then answer in one piece or as a stream."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        job.emit = lambda kind, payload: loop.call_soon_threadsafe(events.put_nowait, (kind, payload))
        try:
            self.engine.submit(job)
        except QueueFull as err:
            raise ApiError(429, str(err), "rate_limit_error", code="queue_full") from None
        try:
            await events.get()  # ("start", exit): the request's batch has formed
        except asyncio.CancelledError:
            job.cancel()
            raise
        self.metrics.started(job)
        reply = _Reply(job, chat, self.config.model_name, route, self.metrics)
        return await reply.whole(events) if not stream else reply.stream(events)


class _Reply:
    """One answer in OpenAI's shapes: a completion object, or server-sent chunks ending in [DONE]."""

    def __init__(self, job: Job, chat: bool, model_name: str, route: str, metrics: _Metrics):
        self.job, self.chat, self.model_name, self.route, self.metrics = job, chat, model_name, route, metrics
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.kind = "chat.completion" if chat else "text_completion"
        exit_layer = job.exit_layer
        self.exit_label = FULL if exit_layer is None else exit_layer
        self.headers = {"X-Balcony-Exit": label(exit_layer)}

    async def whole(self, events: asyncio.Queue):
        from fastapi.responses import JSONResponse

        job = self.job
        try:
            while True:
                what, payload = await events.get()
                if what == "error":
                    raise ApiError(500, payload, "server_error")
                if what == "done":
                    break
        finally:
            job.cancel()  # a no-op when finished; frees the slot when the client left early
        usage = self.metrics.finished(job, self.route, payload)
        choice = ({"index": 0, "message": {"role": "assistant", "content": job.text}} if self.chat
                  else {"index": 0, "text": job.text, "logprobs": None})
        choice["finish_reason"] = payload["finish_reason"]
        return JSONResponse({"id": self.id, "object": self.kind, "created": self.created, "model": self.model_name,
                             "choices": [choice], "usage": usage, "exit_layer": self.exit_label}, headers=self.headers)

    def chunk(self, delta: str | None, reason: str | None, first: bool = False) -> str:
        if self.chat:
            body = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
            choice = {"index": 0, "delta": body, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        data = {"id": self.id, "object": self.kind + (".chunk" if self.chat else ""), "created": self.created,
                "model": self.model_name, "choices": [choice], "exit_layer": self.exit_label}
        return f"data: {json.dumps(data)}\n\n"

    def stream(self, events: asyncio.Queue):
        from fastapi.responses import StreamingResponse

        async def sse():
            try:
                if self.chat:
                    yield self.chunk(None, None, first=True)
                while True:
                    what, payload = await events.get()
                    if what == "delta":
                        yield self.chunk(payload, None)
                    elif what == "error":
                        yield f"data: {json.dumps({'error': {'message': payload, 'type': 'server_error'}})}\n\n"
                        break
                    else:
                        self.metrics.finished(self.job, self.route, payload)
                        yield self.chunk(None, payload["finish_reason"])
                        break
                yield "data: [DONE]\n\n"
            finally:
                self.job.cancel()  # the client disconnected (or we are done): free the slot

        return StreamingResponse(sse(), media_type="text/event-stream", headers=self.headers)


def _error_response(err: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}},
                        status_code=err.status)


def _guard(config: ServeConfig, metrics):
    """The HTTP middleware every request passes: the API key (all routes but /health), the body-size
    limit, and the request counter by route and status."""

    async def guard(request, call_next):
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
            response = _error_response(err)
        metrics.requests.labels(route, str(response.status_code)).inc()
        return response

    return guard


def create_app(model: BalconyModel, config: ServeConfig | None = None, *, calibrate: bool = True):
    """The FastAPI app: routes, API-key and body-size guard, metrics; the engine starts with the app."""
    from fastapi import FastAPI, Request
    from fastapi.responses import PlainTextResponse
    from prometheus_client import CONTENT_TYPE_LATEST

    config = config or ServeConfig()
    if model.tokenizer is None:
        raise BalconyError("serving text needs a tokenizer; save one beside the base model")
    engine = Engine(model, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                    target_ms_per_token=config.target_ms_per_token, batch_window_ms=config.batch_window_ms,
                    min_exit=config.min_exit, prefill_tokens=config.prefill_tokens)
    metrics = _Metrics(engine)
    api = _Api(model, config, engine, metrics)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.to_thread(engine.start, calibrate)
        yield
        # uvicorn has stopped accepting connections and waited for open ones; let the rest finish.
        await asyncio.to_thread(engine.stop, True, config.drain_seconds)

    app = FastAPI(title="balcony", lifespan=lifespan)
    app.state.engine = engine

    app.middleware("http")(_guard(config, metrics))

    @app.exception_handler(ApiError)
    async def api_error(_, err: ApiError):
        return _error_response(err)

    @app.get("/health")
    async def health():
        return {"status": "ok", "load": engine.load}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "balcony",
            "base": model.balcony_config.base_model, "exits": model.exits, "num_layers": model.num_layers,
        }]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await api.parse(request, api.completion_body)
        return await api.run(api.make_job(body, api.completion_ids(body)), "/v1/completions", chat=False,
                             stream=body.stream)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await api.parse(request, api.chat_body)
        return await api.run(api.make_job(body, api.chat_ids(body)), "/v1/chat/completions", chat=True,
                             stream=body.stream)

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
