"""`gptforge serve`: a model behind OpenAI's completions API, batched, with a web playground.

FastAPI declares the API and uvicorn runs it; this module turns HTTP into engine jobs and engine pieces back into
JSON or server-sent events, and holds the server's policy: the API key, the size limits, the queue bound, the
errors in OpenAI's shape, the shutdown. Decoding itself, continuous batching over the KV cache, is batching.py's.
"""

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import importlib.resources
import ipaddress
import json
import os
import secrets
import threading
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import torch
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptforge.batching import Engine, EngineStopped, InvalidJob, Job, Piece, QueueFull, Sampling
from gptforge.errors import GptforgeError
from gptforge.generate import decoding_model
from gptforge.source import SourceOptions

MAX_STOP = 4  # stop strings per request, as OpenAI allows
PLAYGROUND_CSP = (  # the page may talk to this server only: no CDN, no other origin
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)


@dataclass
class ServeOptions(SourceOptions):
    host: str = field(default="127.0.0.1", metadata={"help": "the address to listen on; 0.0.0.0: every interface"})
    port: int = field(default=8000, metadata={"help": "the port to listen on (0: any free one)"})
    max_batch: int = field(default=16, metadata={"help": "samples decoded together in one forward (KV cache slots)"})
    max_queue: int = field(default=64, metadata={"help": "prompts that may wait for a slot; beyond, 429"})
    max_tokens_limit: int | None = field(
        default=None, metadata={"help": "the largest max_tokens a request may ask (None: the model's block_size)"}
    )
    max_request_bytes: int = field(default=1 << 20, metadata={"help": "the largest request body; beyond, 413"})
    api_key: str | None = field(
        default=None, metadata={"help": "require Authorization: Bearer KEY on /v1 (default: $GPTFORGE_API_KEY)"}
    )
    batch_invariant: bool = field(
        default=True, metadata={"help": "a sample's numbers never depend on the others in its batch (False: faster "
                                         "with few requests)"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch's CPU threads (None: torch's default)"})
    shutdown_timeout: float = field(
        default=30.0, metadata={"help": "seconds a SIGTERM waits for requests in flight before cutting them off"}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise GptforgeError(f"--port={self.port} must be in 0..65535")
        for name in ("max_batch", "max_queue", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise GptforgeError(f"--{name}={getattr(self, name)} must be at least 1")
        if self.threads is not None and self.threads < 1:
            raise GptforgeError(f"--threads={self.threads} must be at least 1, or None")
        if self.max_tokens_limit is not None and self.max_tokens_limit < 1:
            raise GptforgeError(f"--max_tokens_limit={self.max_tokens_limit} must be at least 1, or None")
        if self.api_key == "":
            raise GptforgeError("--api_key is empty; give a key, or leave the option out")
        if self.shutdown_timeout < 0:
            raise GptforgeError(f"--shutdown_timeout={self.shutdown_timeout} must be >= 0")


# -- the API's shapes --


class StreamOptions(BaseModel):
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """OpenAI's `POST /v1/completions` body; `top_k` is an extension. Unknown fields are refused."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 62)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI fields this server accepts at their neutral values only (clients often send them)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, if any."""
        neutral = {"echo": (False,), "logprobs": (None,), "best_of": (None, 1), "suffix": (None, ""),
                   "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": (None, {})}
        return next((name for name, values in neutral.items() if getattr(self, name) not in values), None)


class APIError(Exception):
    """An error response in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "server_error" if self.status >= 500 else "rate_limit_error" if self.status == 429 else (
            "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# -- limits and auth --


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is answered 413 before the app sees any of it.

    The body (small: it is JSON) is read here and replayed to the app, so a chunked upload without a
    Content-Length is bounded too; after the replay, `receive` is the server's again (disconnect notices).
    """

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"the request body is over this server's limit of {self.limit} bytes",
                             code="request_too_large").response()
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            return await too_large(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await too_large(scope, receive, send)
            if not message.get("more_body", False):
                break
        replay: Message | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replayed() -> Message:
            nonlocal replay
            if replay is None:
                return await receive()
            message, replay = replay, None
            return message

        return await self.app(scope, replayed, send)


def bearer_check(api_key: str | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency that requires `Authorization: Bearer <api_key>`, compared in constant time (digests of equal
    length, so not even the key's length leaks); no check when there is no key."""
    expected = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        digest = hashlib.sha256(given.strip().encode()).digest()
        if not (hmac.compare_digest(digest, expected) and scheme.lower() == "bearer"):
            raise APIError(401, "Incorrect or missing API key: send the header Authorization: Bearer KEY",
                           code="invalid_api_key")

    return check


# -- from engine pieces to responses --


class EngineFailure(Exception):
    """The engine ended a job with an error."""


class Pieces:
    """The pieces of one request's jobs, carried from the engine's thread into the event loop."""

    def __init__(self, n_jobs: int, n: int):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Piece]] = asyncio.Queue()
        self.n, self.open = n, n_jobs * n

    def sink(self, job_index: int) -> Callable[[Piece], None]:
        """The `on_piece` of job `job_index`."""

        def put(piece: Piece) -> None:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (job_index, piece))

        return put

    async def __aiter__(self) -> AsyncIterator[tuple[int, Piece]]:
        """(choice index, piece) until every sample has ended; EngineFailure on an error piece."""
        while self.open:
            job_index, piece = await self.queue.get()
            if piece.error is not None:
                raise EngineFailure(piece.error)
            self.open -= piece.finish_reason is not None
            yield job_index * self.n + piece.index, piece


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: a `data:` line and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def client_gone(request: Request) -> None:
    """Return once the client has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- the app --


def create_app(engine: Engine, model_id: str, opts: ServeOptions) -> FastAPI:
    """The ASGI app around `engine`: it starts and stops the engine with its lifespan."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="gptforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.draining = False  # set when a signal starts the shutdown: new requests get 503
    app.add_middleware(BodyLimit, limit=opts.max_request_bytes)
    created = int(time.time())
    block_size = engine.model.config.block_size
    max_tokens_limit = min(opts.max_tokens_limit or block_size, block_size)
    tokenizer = engine.tokenizer
    page = importlib.resources.files("gptforge").joinpath("playground.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def api_error(_: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        error = e.errors()[0]
        if error["type"] == "json_invalid":
            return APIError(400, "We could not parse the JSON body of your request.").response()
        param = str(error["loc"][1]) if len(error["loc"]) > 1 else None  # ("body", field, ...)
        return APIError(422, f"{param or 'body'}: {error['msg']}", param, code="invalid_value").response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PLAYGROUND_CSP})

    @app.get("/health")
    async def health() -> JSONResponse:
        body = {"status": "shutting down" if app.state.draining else "ok", "model": model_id, **engine.load()}
        return JSONResponse(body, status_code=503 if app.state.draining else 200)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(bearer_check(opts.api_key))])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "gptforge",
             "max_model_len": block_size}
        ]}

    @v1.post("/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        if app.state.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if body.model is not None and body.model != model_id:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{model_id}`",
                           "model", "model_not_found")
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by gptforge serve", name)
        if body.max_tokens > max_tokens_limit:
            raise APIError(400, f"max_tokens is {body.max_tokens}, above this server's limit of {max_tokens_limit}",
                           "max_tokens")
        stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
        if len(stop) > MAX_STOP:
            raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", "prompt")
        ids = [encode(prompt) for prompt in prompts]
        pieces = Pieces(len(ids), body.n)
        jobs = []
        for i, prompt in enumerate(ids):  # choice c of seed s draws as choice 0 of seed s + c
            seed = None if body.seed is None else body.seed + i * body.n
            sampling = Sampling(body.max_tokens, body.temperature, body.top_k, body.top_p, stop, seed)
            jobs.append(Job(prompt, body.n, sampling, pieces.sink(i)))
        try:
            engine.submit(jobs)
        except InvalidJob as e:
            raise APIError(400, str(e), e.param) from None
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}; retry later", code="queue_full") from None
        except EngineStopped as e:
            raise APIError(503, str(e), code="shutting_down") from None
        header = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
                  "model": model_id}
        prompt_tokens = sum(len(prompt) for prompt in ids)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                stream(pieces, jobs, header, prompt_tokens if include_usage else None),
                media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await complete(request, pieces, jobs, header, prompt_tokens)

    def encode(prompt: str) -> list[int]:
        """A prompt's ids; an empty prompt is end-of-text, where the tokenizer has one."""
        try:
            ids = tokenizer.encode(prompt)
        except GptforgeError as e:
            raise APIError(400, f"the prompt cannot be tokenized: {e}", "prompt") from None
        if not ids and tokenizer.eot_token is None:
            raise APIError(400, "the prompt is empty and this model's tokenizer has no end-of-text token", "prompt")
        return ids or [tokenizer.eot_token]

    def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def cancel(jobs: list[Job]) -> None:
        for job in jobs:
            engine.cancel(job)

    async def stream(
        pieces: Pieces, jobs: list[Job], header: dict[str, Any], prompt_tokens: int | None
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece, the usage when asked for, then [DONE]. Starlette cancels this
        generator when the client disconnects; `finally` then frees the jobs' slots."""
        completion_tokens = 0
        try:
            async for choice, piece in pieces:
                completion_tokens += piece.tokens
                yield sse({**header, "choices": [
                    {"index": choice, "text": piece.text, "logprobs": None, "finish_reason": piece.finish_reason}
                ]})
            if prompt_tokens is not None:
                yield sse({**header, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        except EngineFailure as e:
            yield sse(APIError(500, str(e)).body())
        finally:
            cancel(jobs)

    async def complete(
        request: Request, pieces: Pieces, jobs: list[Job], header: dict[str, Any], prompt_tokens: int
    ) -> JSONResponse:
        """The whole completion as one JSON body; a client that leaves first cancels its jobs at once."""
        n_choices = len(jobs) * jobs[0].n
        texts: list[list[str]] = [[] for _ in range(n_choices)]
        reasons: list[str | None] = [None] * n_choices

        async def collect() -> int:
            tokens = 0
            async for choice, piece in pieces:
                texts[choice].append(piece.text)
                reasons[choice] = piece.finish_reason or reasons[choice]
                tokens += piece.tokens
            return tokens

        collecting, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone(request))
        try:
            await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not collecting.done():
                collecting.cancel()
                cancel(jobs)
        if collecting.cancelled():  # the client is gone: nobody reads this
            return JSONResponse({}, status_code=499)
        try:
            completion_tokens = collecting.result()
        except EngineFailure as e:
            raise APIError(500, str(e)) from None
        choices = [{"index": i, "text": "".join(parts), "logprobs": None, "finish_reason": reason}
                   for i, (parts, reason) in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({**header, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})

    app.include_router(v1)
    return app


# -- running it --


class Server(uvicorn.Server):
    """uvicorn's server, telling the app when a signal starts the shutdown: new requests then get 503 while
    those in flight run to their end (for up to `shutdown_timeout` seconds)."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.app.state.draining = True
        super().handle_exit(sig, frame)


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a background thread for the duration of the block, yielding its base URL: for tests and
    notebooks (no signal handling; `serve` is the command's way)."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning")
    server = uvicorn.Server(config)
    sock = config.bind_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="gptforge-uvicorn", daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server did not start")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def model_name(init_from: str, out_dir: str) -> str:
    """The id clients see in /v1/models: the hub name, or the run's or directory's own name."""
    name = out_dir if init_from == "resume" else init_from
    return Path(name).resolve().name if Path(name).exists() else name


def serve(opts: ServeOptions) -> None:
    """Load the model, start the engine and serve until SIGINT or SIGTERM."""
    opts = dataclasses.replace(opts, api_key=opts.api_key or os.environ.get("GPTFORGE_API_KEY") or None)
    if not is_loopback(opts.host) and opts.api_key is None:
        warnings.warn(f"listening on {opts.host} without an API key: anyone who can reach it can use it",
                      stacklevel=1)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    source = opts.load()
    device, dtype = opts.placement()
    model = decoding_model(source.model, device, dtype)
    engine = Engine(model, source.tokenizer, opts.max_batch, opts.max_queue, opts.batch_invariant)
    model_id = model_name(opts.init_from, opts.out_dir)
    app = create_app(engine, model_id, opts)
    config = uvicorn.Config(app, host=opts.host, port=opts.port, timeout_graceful_shutdown=opts.shutdown_timeout,
                            log_level="info")
    try:
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged why (in use, not allowed) and exits: say it the command's way
        raise GptforgeError(f"cannot listen on {opts.host}:{opts.port}") from None
    host = f"[{opts.host}]" if ":" in opts.host else opts.host
    print(f"gptforge serve: {model_id} on {device} ({dtype}), {opts.max_batch} slots: "
          f"http://{host}:{sock.getsockname()[1]}/", flush=True)
    Server(config, app).run(sockets=[sock])
