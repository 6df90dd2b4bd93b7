"""What `POST /v1/completions` does: a request's prompts become engine jobs, and the jobs' deltas become one
JSON body or a stream of server-sent events.

It holds the request's policy (the model's id, the max_tokens limit, the stop strings, tokenizing the
prompts or checking their token ids, logit_bias, logprobs and echo, best_of's choice), carries deltas from
the engine's thread into the event loop, and cancels a request's jobs when its client leaves; chat.py uses
the same plumbing (`check_model`, `stop_strings`, `logit_bias`, `submit`, `gather`, `cancel`). The JSON it
writes is shaped by api.py and logprobs.py; decoding is engine.py's; the route is app.py's, the API key and
the body limit guards.py's.
"""

import asyncio
import contextlib
import dataclasses
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from gptforge.errors import GptforgeError
from gptforge.serve.api import (
    MAX_BIAS,
    MAX_LOGPROBS,
    APIError,
    CompletionRequest,
    choice,
    completion_header,
    usage,
)
from gptforge.serve.engine import (
    Delta,
    Engine,
    EngineStopped,
    InvalidJob,
    Job,
    QueueFull,
    Sampling,
    TokenLogprob,
)
from gptforge.serve.logprobs import CompletionLogprobs, TokenStrings, joined

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


def vocabulary(engine: Engine) -> int:
    """The token ids a request may name: those both the tokenizer and the model have."""
    return min(engine.tokenizer.vocab_size, engine.model.config.vocab_size)


def logit_bias(bias: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """A request's `logit_bias` as (token id, bias) pairs: a 400 for a key that is no token id of the
    vocabulary (decimal digits, as OpenAI's are) and for a bias outside [-100, 100]."""
    pairs: dict[int, float] = {}
    for key, value in (bias or {}).items():
        if not (key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab_size):
            raise APIError(400, f"logit_bias: {key[:40]!r} is no token id of this model's vocabulary "
                                f"(0 to {vocab_size - 1})", "logit_bias")
        if not -MAX_BIAS <= value <= MAX_BIAS:
            raise APIError(400, f"logit_bias[{key!r}] is {value}: a bias is between -{MAX_BIAS} and "
                                f"{MAX_BIAS}", "logit_bias")
        pairs[int(key)] = float(value)
    return tuple(pairs.items())


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


@dataclass
class Answer:
    """A sample as a whole: its text, how it ended, the tokens it drew, and, when the job asked, their
    logprobs (and the prompt's)."""

    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt: tuple[TokenLogprob, ...] | None = None


async def gather(engine: Engine, request: Request, deltas: Deltas, jobs: list[Job]) -> list[Answer] | None:
    """Every sample whole, in choice order; None when the client left first, whose jobs are then cancelled at
    once. APIError 500 when the engine failed."""
    answers = [Answer() for _ in range(len(jobs) * jobs[0].n)]

    async def collect() -> None:
        async for index, delta in deltas:
            answer = answers[index]
            answer.text += delta.text
            answer.finish_reason = delta.finish_reason or answer.finish_reason
            answer.tokens += delta.tokens
            answer.logprobs += delta.logprobs
            answer.prompt = delta.prompt if delta.prompt is not None else answer.prompt

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
        collecting.result()
    except EngineFailure as e:
        raise APIError(500, str(e)) from None
    return answers


def best(candidates: list[Answer], n: int) -> list[Answer]:
    """best_of's choice: the `n` candidates of the highest summed logprob, best first (ties: the earlier)."""
    if len(candidates) == n:
        return candidates
    return sorted(candidates, key=lambda a: -sum(e.logprob or 0.0 for e in a.logprobs))[:n]


@dataclass(frozen=True)
class Prompt:
    """A prompt's ids, and the text echo shows: the prompt as sent, or its ids decoded."""

    ids: list[int]
    text: str


class ChoiceText:
    """A choice's text and logprobs as they are handed out, the whole at once or a stream's pieces: with echo,
    the prompt's text and logprobs come first, with the first piece."""

    def __init__(self, prompt: Prompt, echo: bool, strings: TokenStrings | None):
        self.prompt, self.echo = prompt, echo
        self.logprobs = None if strings is None else CompletionLogprobs(strings)
        self.started, self.length = False, 0

    def piece(
        self, text: str, logprobs: Sequence[TokenLogprob], prompt: Sequence[TokenLogprob] | None
    ) -> tuple[str, dict[str, Any] | None]:
        parts, restart = [], None
        if not self.started and self.echo:
            text = self.prompt.text + text
            restart = len(self.prompt.text)
            if self.logprobs is not None:
                parts.append(self.logprobs.part(prompt or (), restart))
        self.started = True
        self.length += len(text)
        if self.logprobs is None:
            return text, None
        parts.append(self.logprobs.part(logprobs, self.length, restart))
        return text, joined(*parts)


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
        self.vocab_size = vocabulary(engine)
        self.strings = TokenStrings(self.tokenizer)

    async def respond(self, body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        """The completion of `body`: one JSON body, or server-sent events when it asks to stream."""
        prompts, stop = self.check(body)
        best_of = body.best_of or body.n
        # best_of ranks its candidates by their logprobs: drawn tokens' own at least
        top = body.logprobs if body.logprobs is not None else 0 if best_of > body.n else None
        sampling = Sampling(
            body.max_tokens, body.temperature, body.top_k, body.top_p, stop, body.seed,
            logit_bias=logit_bias(body.logit_bias, self.vocab_size), presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logprobs=top,
            prompt_logprobs=body.echo and body.logprobs is not None,
        )
        deltas, jobs = submit(self.engine, [prompt.ids for prompt in prompts], best_of, sampling)
        header = completion_header(self.model_id, self.engine.fingerprint)
        prompt_tokens = sum(len(prompt.ids) for prompt in prompts)
        if body.stream:
            include_usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(
                self.stream(body, prompts, deltas, jobs, header, prompt_tokens if include_usage else None),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        return await self.complete(body, prompts, request, deltas, jobs, header, prompt_tokens)

    def check(self, body: CompletionRequest) -> tuple[list[Prompt], tuple[str, ...]]:
        """The request's prompts and stop strings; APIError for what this server does not do."""
        check_model(body.model, self.model_id)
        if (name := body.unsupported()) is not None:
            raise APIError(400, f"{name} is not supported by gptforge serve", name)
        if body.max_tokens > self.max_tokens_limit:
            raise APIError(400, f"max_tokens is {body.max_tokens}, above this server's limit of "
                                f"{self.max_tokens_limit}", "max_tokens")
        if body.logprobs is not None and body.logprobs > MAX_LOGPROBS:
            raise APIError(400, f"logprobs is {body.logprobs}: at most {MAX_LOGPROBS}, as OpenAI's "
                                "completions allow", "logprobs")
        if body.best_of is not None:
            if body.best_of < body.n:
                raise APIError(400, f"best_of ({body.best_of}) must be at least n ({body.n})", "best_of")
            if body.best_of > self.engine.max_batch:
                raise APIError(400, f"best_of must be between 1 and {self.engine.max_batch} (this server's "
                                    f"batch), got {body.best_of}", "best_of")
            if body.stream and body.best_of > body.n:
                raise APIError(400, "best_of cannot stream: the best are known at the end; stream with "
                                    "best_of equal to n, or not at all", "best_of")
        return self.prompts(body.prompt), stop_strings(body.stop)

    def prompts(self, prompt: str | list[str] | list[int] | list[list[int]]) -> list[Prompt]:
        """A request's prompts: a text, texts, token ids, or lists of them."""
        if isinstance(prompt, str):
            return [Prompt(self.encode(prompt), prompt)]
        if not prompt:
            raise APIError(400, "prompt is an empty list", "prompt")
        if isinstance(prompt[0], str):
            return [Prompt(self.encode(text), text) for text in prompt]
        if isinstance(prompt[0], int):
            return [self.token_prompt(prompt, "prompt")]
        return [self.token_prompt(ids, f"prompt[{i}]") for i, ids in enumerate(prompt)]

    def token_prompt(self, ids: list[int], where: str) -> Prompt:
        """A prompt given as token ids, each one of the vocabulary's."""
        if not ids:
            raise APIError(400, f"{where} is an empty list of token ids", "prompt")
        bad = next((token for token in ids if not 0 <= token < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"{where} has the token id {bad}, which is not in this model's vocabulary "
                                f"(0 to {self.vocab_size - 1})", "prompt")
        return Prompt(ids, self.tokenizer.decode(ids))

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

    def choice_text(self, body: CompletionRequest, prompt: Prompt) -> ChoiceText:
        return ChoiceText(prompt, body.echo, None if body.logprobs is None else self.strings)

    async def stream(
        self, body: CompletionRequest, prompts: list[Prompt], deltas: Deltas, jobs: list[Job],
        header: dict[str, Any], prompt_tokens: int | None,
    ) -> AsyncIterator[str]:
        """Server-sent events: a chunk per delta, the usage when asked for, then [DONE]. Starlette cancels
        this generator when the client disconnects; `finally` then frees the jobs' slots."""
        completion_tokens = 0
        choices: dict[int, ChoiceText] = {}
        try:
            async for index, delta in deltas:
                completion_tokens += delta.tokens
                if index not in choices:
                    choices[index] = self.choice_text(body, prompts[index // body.n])
                text, logprobs = choices[index].piece(delta.text, delta.logprobs, delta.prompt)
                yield sse({**header, "choices": [choice(index, text, delta.finish_reason, logprobs)]})
            if prompt_tokens is not None:
                yield sse({**header, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
            yield sse("[DONE]")
        except EngineFailure as e:
            yield sse(APIError(500, str(e)).body())
        finally:
            cancel(self.engine, jobs)

    async def complete(
        self, body: CompletionRequest, prompts: list[Prompt], request: Request, deltas: Deltas,
        jobs: list[Job], header: dict[str, Any], prompt_tokens: int,
    ) -> JSONResponse:
        """The whole completion as one JSON body; a client that leaves first cancels its jobs at once. With
        best_of, each prompt's best n of its best_of candidates; usage counts every candidate's tokens."""
        answers = await gather(self.engine, request, deltas, jobs)
        if answers is None:  # the client is gone: nobody reads this
            return JSONResponse({}, status_code=499)
        candidates = jobs[0].n
        choices = []
        for i, prompt in enumerate(prompts):
            for rank, answer in enumerate(best(answers[i * candidates:(i + 1) * candidates], body.n)):
                text, logprobs = self.choice_text(body, prompt).piece(answer.text, answer.logprobs,
                                                                      answer.prompt)
                choices.append(choice(i * body.n + rank, text, answer.finish_reason, logprobs))
        completion_tokens = sum(answer.tokens for answer in answers)
        return JSONResponse({**header, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)})
