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
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..core.errors import BalconyError, ExitError
from ..core.model import BalconyModel
from ..core.policy import FULL, DepthRequest, label
from .engine import Engine, Job, QueueFull
from .reply import ApiError, Reply

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
    # while requests decode, newcomers join once this many wait per decoding request, or once held
    # this many decode steps (0: at every step, the default)
    waiting_served_ratio: float = 1.5
    max_waiting_steps: int = 0
    max_waiting_ms: float = 0.0  # or once the oldest waited this long (0: no bound in time)
    max_queue: int = 64
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 1024
    batch_window_ms: float = 5.0
    drain_seconds: float = 30.0  # how long SIGTERM waits for in-flight requests
    threads: int | None = None  # torch threads of a lone request's decode steps (None: every core but one)
    batch_threads: int | None = None  # of decode steps of several requests and prompt chunks (None: every core)
    compile: bool = False  # full-depth decode steps (up to runner.GRAPH_ROWS rows) through the torch.compile'd decoder
    prefix_cache_mb: float = 256  # KV of prompt beginnings requests share, kept for the next (0: none; prefix.py)


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
        self.cached_tokens = Counter("balcony_prompt_tokens_cached", "Prompt tokens whose KV came from the prefix "
                                     "cache (not computed again)", registry=registry)
        self.latency = Histogram("balcony_request_latency_seconds", "Request latency, admission to last token", ["route"],
                                 registry=registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.ttft = Histogram("balcony_time_to_first_token_seconds", "Admission to first output token",
                              registry=registry, buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        # a step decodes one token of every running row; "prefill" steps also fed newcomers' prompt tokens
        self.steps = Histogram("balcony_engine_step_seconds", "Engine steps by kind: decode only, or with a "
                               "prompt chunk of newcomers (prefill)", ["kind"], registry=registry,
                               buckets=(0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.125, 0.15,
                                        0.2, 0.3, 0.5, 1, 2.5))
        self.step_rows = Counter("balcony_engine_decoded_rows", "Rows decoded by engine steps (one token each)",
                                 registry=registry)
        engine.on_step = self.stepped
        Gauge("balcony_load", "Requests queued or decoding", registry=registry).set_function(lambda: engine.load)
        Gauge("balcony_quality_floor_conflicts", "Load-adaptive choices where the latency target asked for a "
              "shallower exit than the quality floor allows (the floor held)", registry=registry
              ).set_function(lambda: engine.scheduler.floor_conflicts)

    def stepped(self, step, seconds: float) -> None:
        self.steps.labels("prefill" if step.prefilled else "decode").observe(seconds)
        self.step_rows.inc(len(step.decoded))

    def started(self, job: Job) -> None:
        self.by_exit.labels(label(job.exit_layer)).inc()
        self.prompt_tokens.inc(len(job.prompt_ids))
        self.cached_tokens.inc(job.cached_tokens)

    def finished(self, job: Job, route: str, done: dict) -> None:
        self.tokens.inc(done["completion_tokens"])
        self.latency.labels(route).observe(time.perf_counter() - job.submitted)
        if job.first_token_at is not None:
            self.ttft.observe(job.first_token_at - job.submitted)

    def exposition(self) -> str:
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode()


def _has_lone_surrogate(payload) -> bool:
    """Whether any string in a parsed JSON value (keys too) cannot be encoded as UTF-8."""
    stack = [payload]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            stack += [*item.keys(), *item.values()]
        elif isinstance(item, list):
            stack += item
    return False


class _Mailbox:
    """Calls from the engine thread to the event loop, many per wake-up: the engine posts a token
    event for every running request each step, and one `call_soon_threadsafe` (a write to the
    loop's wake-up pipe) per event would cost the event loop a wake-up per request per step."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.calls: list = []
        self.lock = threading.Lock()

    def post(self, fn, *args) -> None:
        with self.lock:
            self.calls.append((fn, args))
            if len(self.calls) > 1:
                return  # a wake-up is on its way and will take this one too
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self.lock:
            calls, self.calls = self.calls, []
        for fn, args in calls:
            fn(*args)


class _Api:
    """What the routes do: read and check a body, turn it into `Job`s, answer from the engine's events."""

    def __init__(self, model: BalconyModel, config: ServeConfig, engine: Engine, metrics: _Metrics):
        self.model, self.config, self.engine, self.metrics = model, config, engine, metrics
        self.vocab = model.base.config.vocab_size
        # a model name per depth: "NAME:E" pins exit E ("NAME:full" the full model); NAME alone
        # leaves the depth to the body's fields or the load-adaptive policy
        self.depths = {f"{name}:{label(e)}": e for name in (config.model_name, *config.aliases)
                       for e in (*model.exits, None)}
        self.mailbox: _Mailbox | None = None  # made on the serving loop's first request

    def model_ids(self) -> list[str]:
        return [self.config.model_name, *(f"{self.config.model_name}:{label(e)}" for e in (*self.model.exits, None))]

    async def parse(self, request, schema):
        from pydantic import ValidationError

        raw = await request.body()
        config = self.config
        if len(raw) > config.max_body_bytes:
            raise ApiError(413, f"request body of {len(raw)} bytes is over the limit of {config.max_body_bytes}")
        try:
            payload = json.loads(raw)
        except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, too deep, an integer too long to read
            raise ApiError(400, f"the request body is not valid JSON: {err}") from None
        if not isinstance(payload, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if _has_lone_surrogate(payload):  # JSON allows "\ud800"; no tokenizer (nor UTF-8) takes it
            raise ApiError(400, "a string in the request body holds a lone UTF-16 surrogate (an unpaired "
                           "\\ud800-\\udfff escape): send valid Unicode")
        try:
            body = schema.model_validate(payload)
        except ValidationError as err:
            first = err.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ApiError(400, f"{where}: {first['msg']}", param=str(first["loc"][0]) if first["loc"] else None
                           ) from None
        if body.model not in (None, config.model_name, *config.aliases, *self.depths):
            raise ApiError(404, f"model {body.model!r} is not served here; this server serves "
                           f"{', '.join(map(repr, self.model_ids()))} (GET /v1/models)", param="model",
                           code="model_not_found")
        return body

    def pick_exit(self, body) -> tuple[int | None, bool]:
        """The exit a body asks for (by its depth fields or its model name), and whether it asked (else
        the engine's load-adaptive policy decides)."""
        chosen = [k for k in ("exit_layer", "budget", "max_ms_per_token") if getattr(body, k) is not None]
        try:  # the one depth policy: refused here exactly as in the CLI and the Python API
            exit_layer = self.model.policy.resolve(DepthRequest(body.exit_layer, body.budget, body.max_ms_per_token))
        except ExitError as err:
            raise ApiError(400, str(err), param=chosen[-1] if chosen else None) from None
        if body.model not in self.depths:
            return exit_layer, bool(chosen)
        named = self.depths[body.model]
        if chosen and exit_layer != named:
            raise ApiError(400, f"model {body.model!r} runs exit {label(named)}, but {chosen[0]} asks for exit "
                           f"{label(exit_layer)}: send one or make them agree", param=chosen[0])
        return named, True

    def sampling(self, body) -> dict:
        """A body's sampling settings as `Job` fields, defaults filled in."""
        bias = {int(k): v for k, v in (body.logit_bias or {}).items()}
        if any(k >= self.vocab for k in bias):
            raise ApiError(400, f"logit_bias keys must be token ids in [0, {self.vocab})", param="logit_bias")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return {"temperature": 1.0 if body.temperature is None else body.temperature,
                "top_p": 1.0 if body.top_p is None else body.top_p, "top_k": max(0, body.top_k or 0),
                "stop": [s for s in stop if s], "ignore_eos": body.ignore_eos, "min_tokens": body.min_tokens,
                "presence_penalty": body.presence_penalty or 0.0, "frequency_penalty": body.frequency_penalty or 0.0,
                "repetition_penalty": body.repetition_penalty or 1.0, "logit_bias": bias}

    def make_jobs(self, body, prompt_ids: list[int], max_tokens: int, logprobs: int | None,
                  echo: bool = False) -> list[Job]:
        """The body's n jobs: one per choice, seeded `seed + i` so that choices differ and repeat."""
        config = self.config
        if len(prompt_ids) > config.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens, over the limit of {config.max_prompt_tokens}",
                           param="prompt")
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if max_tokens > config.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over the limit of {config.max_tokens_limit}",
                           param="max_tokens")
        n = body.n or 1
        if n > config.max_queue:
            raise ApiError(400, f"n {n} is over this server's queue of {config.max_queue}", param="n")
        exit_layer, pinned = self.pick_exit(body)
        settings = self.sampling(body)
        return [Job(prompt_ids=list(prompt_ids), max_tokens=max_tokens, exit_layer=exit_layer, pinned=pinned,
                    seed=None if body.seed is None else body.seed + i, logprobs=logprobs,
                    prompt_logprobs=echo and logprobs is not None, **settings) for i in range(n)]

    def completion_prompts(self, body) -> list[tuple[str | list[int], list[int]]]:
        """Each prompt as sent (for echo) with its token ids: one text, one list of ids, or a list of
        either (a batch of prompts)."""
        prompts = body.prompt
        if isinstance(prompts, str) or (prompts and all(isinstance(t, int) for t in prompts)):
            prompts = [prompts]  # one text, or one list of token ids
        if not prompts:
            raise ApiError(400, "the prompt is empty", param="prompt")
        found = []
        for prompt in prompts:
            if isinstance(prompt, str):
                with self.engine.tokenizer_lock:
                    found.append((prompt, self.model.tokenizer(prompt, add_special_tokens=True)["input_ids"]))
            elif any(not 0 <= t < self.vocab for t in prompt):
                raise ApiError(400, f"prompt token ids must be in [0, {self.vocab})", param="prompt")
            else:
                found.append((prompt, list(prompt)))
        return found

    def chat_ids(self, body) -> list[int]:
        tokenizer = self.model.tokenizer
        if getattr(tokenizer, "chat_template", None) is None:
            raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions")
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        with self.engine.tokenizer_lock:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(ids["input_ids"])

    def token_texts(self, ids: list[int]) -> list[str]:
        with self.engine.tokenizer_lock:
            return self.model.tokenizer.batch_decode([[t] for t in ids])

    def echo_text(self, prompt, ids: list[int]) -> str:
        if isinstance(prompt, str):
            return prompt
        with self.engine.tokenizer_lock:
            return self.model.tokenizer.decode(ids, skip_special_tokens=True)

    async def completions(self, request):
        from .protocol import CompletionBody

        body = await self.parse(request, CompletionBody)
        prompts = self.completion_prompts(body)
        max_tokens = 16 if body.max_tokens is None else body.max_tokens
        jobs, echo = [], []  # choices in OpenAI's order: each prompt's n choices together
        for prompt, ids in prompts:
            made = self.make_jobs(body, ids, max_tokens, body.logprobs, echo=bool(body.echo))
            jobs += made
            echo += [self.echo_text(prompt, ids)] * len(made) if body.echo else []
        if len(jobs) > self.config.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n {body.n or 1} choices is over this server's queue of "
                           f"{self.config.max_queue}", param="prompt")
        return await self.run(jobs, "/v1/completions", body, chat=False, echo=echo or None)

    async def chat(self, request):
        from .protocol import ChatBody

        body = await self.parse(request, ChatBody)
        max_tokens = body.max_completion_tokens or body.max_tokens or 16
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await self.run(self.make_jobs(body, self.chat_ids(body), max_tokens, logprobs), "/v1/chat/completions",
                              body, chat=True)

    async def run(self, jobs: list[Job], route: str, body, chat: bool, echo: list[str] | None = None):
        """Submit the jobs, wait for their batches to form, then answer in one piece or as a stream."""
        loop = asyncio.get_running_loop()
        if self.mailbox is None or self.mailbox.loop is not loop:
            self.mailbox = _Mailbox(loop)
        mailbox = self.mailbox
        events: asyncio.Queue = asyncio.Queue()
        waiting, started = [len(jobs)], asyncio.Event()

        def arrived(index: int, kind: str, payload) -> None:
            if kind in ("start", "error"):  # an error before its start must not leave the route waiting
                waiting[0] -= 1
                if waiting[0] <= 0:
                    started.set()
            if kind != "start":
                events.put_nowait((index, kind, payload))

        for index, job in enumerate(jobs):
            job.emit = lambda kind, payload, i=index: mailbox.post(arrived, i, kind, payload)
        try:
            for job in jobs:
                self.engine.submit(job)
        except QueueFull as err:
            for job in jobs:
                job.cancel()
            raise ApiError(429, str(err), "rate_limit_error", code="queue_full") from None
        try:
            await started.wait()
        except asyncio.CancelledError:
            for job in jobs:
                job.cancel()
            raise
        for job in jobs:
            self.metrics.started(job)
        options = body.stream_options if body.stream else None  # usage chunks are a stream's only
        reply = Reply(jobs, chat, self.config.model_name, lambda job, done: self.metrics.finished(job, route, done),
                      decode=self.token_texts, echo=echo, choices_per_prompt=body.n or 1,
                      include_usage=bool(options and options.include_usage),
                      continuous_usage=bool(options and options.continuous_usage_stats))
        return reply.stream(events) if body.stream else await reply.whole(events)

def _error_response(err: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}},
                        status_code=err.status)


async def _on_error(_, err):
    """An `ApiError` answered in OpenAI's shape; Starlette's own (an unknown route or method) too."""
    if isinstance(err, ApiError):
        return _error_response(err)
    response = _error_response(ApiError(err.status_code, str(err.detail)))
    response.headers.update(err.headers or {})
    return response


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
    from starlette.exceptions import HTTPException

    config = config or ServeConfig()
    if model.tokenizer is None:
        raise BalconyError("serving text needs a tokenizer; save one beside the base model")
    engine = Engine(model, max_batch_size=config.max_batch_size, max_queue=config.max_queue,
                    target_ms_per_token=config.target_ms_per_token, batch_window_ms=config.batch_window_ms,
                    min_exit=config.min_exit, prefill_tokens=config.prefill_tokens,
                    waiting_served_ratio=config.waiting_served_ratio, max_waiting_steps=config.max_waiting_steps,
                    max_waiting_ms=config.max_waiting_ms, threads=config.threads, batch_threads=config.batch_threads,
                    compile=config.compile, prefix_cache_mb=config.prefix_cache_mb)
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

    for kind in (ApiError, HTTPException):
        app.exception_handler(kind)(_on_error)

    @app.get("/health")
    async def health():
        # queued / running: requests held, cancelled ones included until they leave (0 and 0 when idle)
        return {"status": "ok", "load": engine.load, **engine.scheduler.slots()}

    @app.get("/metrics")
    async def metrics_route():
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        entry = {"object": "model", "created": 0, "owned_by": "balcony", "base": model.balcony_config.base_model,
                 "exits": model.exits, "num_layers": model.num_layers}
        ids = api.model_ids()
        return {"object": "list", "data": [{"id": ids[0], **entry}, *(
            {"id": name, **entry, "exit_layer": api.depths[name] or FULL} for name in ids[1:])]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await api.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await api.chat(request)

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
