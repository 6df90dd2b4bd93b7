"""What `POST /v1/completions` does: a request's prompts become engine jobs, and the jobs' deltas become one
JSON body or a stream of server-sent events.

It holds the request's policy (the model's id, the max_tokens limit, the stop strings, tokenizing the
prompts), carries deltas from the engine's thread into the event loop, and cancels a request's jobs when its
client leaves; chat.py uses the same plumbing (`check_model`, `stop_strings`, `submit`, `gather`, `cancel`).
The JSON it writes is shaped by api.py; decoding is engine.py's; the route is app.py's, the API key and the
body limit guards.py's.
"""

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from gptforge.errors import GptforgeError
from gptforge.serve.api import APIError, CompletionRequest, choice, completion_header, usage
from gptforge.serve.engine import Delta, Engine, EngineStopped, InvalidJob, Job, QueueFull, Sampling

MAX_STOP = 4  # stop strings per request, as OpenAI allows


class EngineFailure(Exception):
    """The engine ended a job with an error."""


class Deltas:
    """The deltas of one request's jobs, carried from the engine's thread into the event loop."""

    def __init__(self, n_jobs: int, n: int):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Delta]] = asyncio.Queue()
        self.n, self.open = n, n_jobs * n

    def sink(self, job_index: int) -> Callable[[Delta], None]:
        """The `on_delta` of job `job_index`."""

        def put(delta: Delta) -> None:
            with contextlib.suppress(RuntimeError):  # a closed event loop: nobody is listening any more
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (job_index, delta))

        return put

    async def __aiter__(self) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) until every sample has ended; EngineFailure on an error delta."""
        while self.open:
            job_index, delta = await self.queue.get()
            if delta.error is not None:
                raise EngineFailure(delta.error)
            self.open -= delta.finish_reason is not None
            yield job_index * self.n + delta.index, delta


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event: a `data:` line and a blank line."""
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


async def client_gone(request: Request) -> None:
    """Return once the client has disconnected."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def check_model(model: str | None, model_id: str) -> None:
    """A request may name the served model or none; any other is 404."""
    if model is not None and model != model_id:
        raise APIError(404, f"The model `{model}` does not exist; "
                            f"this server serves `{model_id}`", "model", "model_not_found")


def stop_strings(stop: str | list[str] | None) -> tuple[str, ...]:
    """A request's `stop` as a tuple; more than MAX_STOP is a 400."""
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if len(stops) > MAX_STOP:
        raise APIError(400, f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    return stops


def submit(engine: Engine, ids: list[list[int]], n: int, sampling: Sampling) -> tuple[Deltas, list[Job]]:
    """Queue a job per prompt, `n` samples each; their deltas arrive in the returned Deltas. Choice c of seed
    s draws as choice 0 of seed s + c: prompt i's samples start at seed s + i * n."""
    deltas = Deltas(len(ids), n)
    jobs = []
    for i, prompt in enumerate(ids):
        seed = None if sampling.seed is None else sampling.seed + i * n
        jobs.append(Job(prompt, n, dataclasses.replace(sampling, seed=seed), deltas.sink(i)))
    try:
        engine.submit(jobs)
    except InvalidJob as e:
        raise APIError(400, str(e), e.param) from None
    except QueueFull as e:
        raise APIError(429, f"the server is busy: {e}; retry later", code="queue_full") from None
    except EngineStopped as e:
        raise APIError(503, str(e), code="shutting_down") from None
    return deltas, jobs


def cancel(engine: Engine, jobs: list[Job]) -> None:
    for job in jobs:
        engine.cancel(job)


async def gather(
    engine: Engine, request: Request, deltas: Deltas, jobs: list[Job]
) -> tuple[list[str], list[str | None], int] | None:
    """Every choice's whole text and finish_reason, and the tokens generated in all; None when the client
    left first, whose jobs are then cancelled at once. APIError 500 when the engine failed."""
    n_choices = len(jobs) * jobs[0].n
    texts: list[list[str]] = [[] for _ in range(n_choices)]
    reasons: list[str | None] = [None] * n_choices

    async def collect() -> int:
        tokens = 0
        async for index, delta in deltas:
            texts[index].append(delta.text)
            reasons[index] = delta.finish_reason or reasons[index]
            tokens += delta.tokens
        return tokens

    collecting, gone = asyncio.ensure_future(collect()), asyncio.ensure_future(client_gone(request))
    try:
        await asyncio.wait({collecting, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not collecting.done():
            collecting.cancel()
            cancel(engine, jobs)
    if collecting.cancelled():  # the client is gone: nobody reads this
        return None
    try:
        tokens = collecting.result()
    except EngineFailure as e:
        raise APIError(500, str(e)) from None
    return ["".join(parts) for parts in texts], reasons, tokens


class Completions:
    """Completions from `engine`'s model, served as `model_id`, of at most `max_tokens_limit` tokens (None:
    the model's block_size; more than that is a GptforgeError, as no completion could reach it)."""

    def __init__(self, engine: Engine, model_id: str, max_tokens_limit: int | None):
        block_size = engine.model.config.block_size
        if max_tokens_limit is not None and max_tokens_limit > block_size:
            raise GptforgeError(f"--max_tokens_limit={max_tokens_limit} is over the model's context of "
                                f"{block_size} tokens (its block_size)")
        self.engine, self.tokenizer, self.model_id = engine, engine.tokenizer, model_id
        self.max_tokens_limit = max_tokens_limit or block_size

    async def respond(self, body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        """The completion of `body`: one JSON body, or server-sent events when it asks to stream."""
        prompts, stop = self.check(body)
        ids = [self.encode(prompt) for prompt in prompts]
        sampling = Sampling(body.max_tokens, body.temperature, body.top_k, body.top_p, stop, body.seed)
        deltas, jobs = submit(self.engine, ids, body.n, sampling)
        header = completion_header(self.model_id)
        prompt_tokens = sum(len(prompt) for prompt in ids)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self.stream(deltas, jobs, header, prompt_tokens if include_usage else None),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self.complete(request, deltas, jobs, header, prompt_tokens)

    def check(self, body: CompletionRequest) -> tuple[list[str], tuple[str, ...]]:
        """The request's prompts and stop strings; APIError for what this server does not do."""
        check_model(body.model, self.model_id)
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by gptforge serve", name)
        if body.max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens is {body.max_tokens}, above this server's limit of "
                                f"{self.max_tokens_limit}", "max_tokens")
        stop = stop_strings(body.stop)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise APIError(400, "prompt is an empty list", "prompt")
        return prompts, stop

    def encode(self, prompt: str) -> list[int]:
        """A prompt's ids; an empty prompt is end-of-text, where the tokenizer has one."""
        try:
            ids = self.tokenizer.encode(prompt)
        except GptforgeError as e:
            raise APIError(400, f"the prompt cannot be tokenized: {e}", "prompt") from None
        if not ids and self.tokenizer.eot_token is None:
            raise APIError(400, "the prompt is empty and this model's tokenizer has no end-of-text token",
                           "prompt")
        return ids or [self.tokenizer.eot_token]

    async def stream(
        self, deltas: Deltas, jobs: list[Job], header: dict[str, Any], prompt_tokens: int | None
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per delta, the usage when asked for, then [DONE]. Starlette cancels
        this generator when the client disconnects; `finally` then frees the jobs' slots."""
        completion_tokens = 0
        try:
            async for index, delta in deltas:
                completion_tokens += delta.tokens
                yield sse({**header, "choices": [choice(index, delta.text, delta.finish_reason)]})
            if prompt_tokens is not None:
                yield sse({**header, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        except EngineFailure as e:
            yield sse(APIError(500, str(e)).body())
        finally:
            cancel(self.engine, jobs)

    async def complete(
        self, request: Request, deltas: Deltas, jobs: list[Job], header: dict[str, Any], prompt_tokens: int
    ) -> JSONResponse:
        """The whole completion as one JSON body; a client that leaves first cancels its jobs at once."""
        gathered = await gather(self.engine, request, deltas, jobs)
        if gathered is None:  # the client is gone: nobody reads this
            return JSONResponse({}, status_code=499)
        texts, reasons, completion_tokens = gathered
        choices = [choice(i, *answer) for i, answer in enumerate(zip(texts, reasons, strict=True))]
        return JSONResponse({**header, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})
