"""OpenAI's completions and chat completions API as this server speaks it: the requests it accepts, the
responses it writes, the errors it answers.

Shapes only: what a valid request is (strict JSON: UTF-8 text, no NaN, no coerced types), what a completion,
a chat completion, their chunks and usage look like, and what every error looks like on the wire, FastAPI's
own (invalid JSON, a missing field, no such route) included. What a request does is completions.py's and
chat.py's; which route answers it is app.py's.
"""

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

# as OpenAI's API: a field of the wrong type is an error, never coerced ("yes" is no boolean, true no
# integer, "0.5" no number; an integer is still a number); NaN and infinities are no numbers either
STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

RETRY_AFTER = 1  # seconds a 429 asks its client to wait: the queue moves at every decode step


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


MAX_LOGPROBS = 5  # a completion's `logprobs` at most, as OpenAI's legacy completions allow
MAX_TOP_LOGPROBS = 20  # a chat completion's `top_logprobs` at most, as OpenAI's chat completions allow
MAX_BIAS = 100  # a logit_bias value is in [-MAX_BIAS, MAX_BIAS], as at OpenAI


class CompletionRequest(BaseModel):
    """OpenAI's `POST /v1/completions` body; `top_k` is an extension. Unknown fields are refused. A prompt is
    a string, a list of them, a list of token ids or a list of such lists."""

    model_config = STRICT

    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 62)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False
    logprobs: int | None = Field(None, ge=0)  # above MAX_LOGPROBS: a 400 naming it
    best_of: int | None = Field(None, ge=1)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # OpenAI fields this server accepts at their neutral values only
    suffix: str | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, if any."""
        return "suffix" if self.suffix not in (None, "") else None


class ContentPart(BaseModel):
    """A part of a message's content, as OpenAI has them; chat.py takes text parts only."""

    model_config = STRICT

    type: str
    text: str | None = None
    # the other kinds' fields, so that an image or a file is refused by name (400), not as an unknown field
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: Any = None


class ChatMessage(BaseModel):
    """One of OpenAI's messages. `role` is any string here: chat.py refuses the roles it does not take (tool,
    function) by name, as it refuses the tool and audio fields when they are set."""

    model_config = STRICT

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None  # accepted and ignored: the chat template has no place for it
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    refusal: str | None = None
    audio: Any = None


class ChatCompletionRequest(BaseModel):
    """OpenAI's `POST /v1/chat/completions` body; `top_k` is an extension. Unknown fields are refused; the
    optional ones may be null, as OpenAI's may."""

    model_config = STRICT

    model: str | None = None
    messages: list[ChatMessage]
    max_tokens: int | None = Field(None, ge=1)  # OpenAI's older name of max_completion_tokens
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=1 << 62)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)  # above MAX_TOP_LOGPROBS: a 400 naming it
    logit_bias: dict[str, float] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    user: str | None = None
    # OpenAI fields this server ignores: they do not change the answer
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    # OpenAI fields this server accepts at their neutral values only
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    modalities: list[str] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    web_search_options: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """The first field set to something this server does not do, if any."""
        neutral = {"tools": (None, []), "tool_choice": (None, "none", "auto"), "functions": (None, []),
                   "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
                   "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
                   "reasoning_effort": (None,), "web_search_options": (None,)}
        return next((name for name, values in neutral.items() if getattr(self, name) not in values), None)


Body = TypeVar("Body", bound=BaseModel)


def json_body(shape: type[Body]) -> Callable[[Request], Awaitable[Body]]:
    """A FastAPI dependency: the request's body as a `shape`, parsed as JSON whatever its Content-Type says
    (`curl -d` sends application/x-www-form-urlencoded). Pydantic parses the bytes itself, so a body that is
    not UTF-8 JSON text (a lone UTF-16 surrogate such as "\\ud800" included) is refused before any of it
    becomes a Python string; RequestValidationError, as FastAPI's own parsing raises, otherwise."""

    async def parse(request: Request) -> Body:
        try:
            return shape.model_validate_json(await request.body())
        except ValidationError as e:
            errors = [{**error, "loc": ("body", *error["loc"])} for error in e.errors(include_url=False)]
            raise RequestValidationError(errors) from None

    return parse


completion_request = json_body(CompletionRequest)
chat_request = json_body(ChatCompletionRequest)


def completion_header(model_id: str, fingerprint: str) -> dict[str, Any]:
    """The fields a completion, and each chunk of its stream, starts with."""
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": model_id, "system_fingerprint": fingerprint}


def choice(index: int, text: str, finish_reason: str | None,
           logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_header(model_id: str, fingerprint: str) -> dict[str, Any]:
    """The fields a chat completion starts with; its chunks' `object` is "chat.completion.chunk"."""
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "object": "chat.completion",
            "created": int(time.time()), "model": model_id, "system_fingerprint": fingerprint}


def chat_choice(index: int, content: str, finish_reason: str | None,
                logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chunk_choice(index: int, delta: dict[str, str], finish_reason: str | None = None,
                 logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
    """A choice of a chat stream's chunk: `delta` is {"role", "content"} first, then {"content"}, then {}."""
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def model_card(model_id: str, created: int, max_model_len: int, chat: bool) -> dict[str, Any]:
    """The served model as `GET /v1/models` lists it and `GET /v1/models/{id}` answers."""
    return {"id": model_id, "object": "model", "created": created, "owned_by": "gptforge",
            "max_model_len": max_model_len, "chat": chat}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


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
        """The error as a response; a 429 says when to come back (Retry-After)."""
        headers = {"Retry-After": str(RETRY_AFTER)} if self.status == 429 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return e.response()


REQUESTS = (CompletionRequest, ChatCompletionRequest, ChatMessage, ContentPart, StreamOptions)
FIELDS = {name for shape in REQUESTS for name in shape.model_fields}  # what a field_path may name


def field_path(error: dict[str, Any]) -> str:
    """Where a validation error is, as a reader names it: `messages[0].content[1].text`. Pydantic's tags of
    a union's members ("str", "list[ContentPart]") and dictionary keys are left out; an unknown field is
    named."""
    loc = error["loc"][1:]  # ("body", field, ...)
    path = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in FIELDS or (i == len(loc) - 1 and error["type"] == "extra_forbidden"):
            path += f".{part}" if path else part
    return path


async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    # the deepest error says the most: a content list's bad part, not "content: not a string" of the union
    error = max(e.errors(), key=lambda error: len(error["loc"]))
    if error["type"] == "json_invalid":
        return APIError(400, f"We could not parse the JSON body of your request ({error['msg']}): send "
                             "UTF-8 JSON text, with no lone UTF-16 surrogates").response()
    param = str(error["loc"][1]) if len(error["loc"]) > 1 else None  # the top-level field
    message = f"{field_path(error) or 'body'}: {error['msg']}"
    return APIError(422, message, param, code="invalid_value").response()


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    no_route = e.status_code in (404, 405)
    message = f"no route {request.method} {request.url.path}" if no_route else str(e.detail)
    return APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()


async def server_error(_: Request, e: Exception) -> JSONResponse:
    """A bug's answer, still in OpenAI's shape. uvicorn logs the exception and then closes the connection:
    `Connection: close` tells the client, which would otherwise send its next request into a closed socket."""
    response = APIError(500, f"The server failed on your request: {type(e).__name__}").response()
    response.headers["Connection"] = "close"
    return response


def answer_errors_in_openai_shape(app: FastAPI) -> None:
    """Make `app` answer APIError, FastAPI's own errors, and any other exception, in OpenAI's shape."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, server_error)
