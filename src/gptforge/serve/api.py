"""OpenAI's completions API as this server speaks it: the request it accepts, the responses it writes, the
errors it answers.

Shapes only: what a valid request is, what a completion and its usage look like, and what every error looks
like on the wire, FastAPI's own (invalid JSON, a missing field, no such route) included. What a request does
is completions.py's; which route answers it is app.py's.
"""

import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException


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


def completion_header(model_id: str) -> dict[str, Any]:
    """The fields a completion, and each chunk of its stream, starts with."""
    return {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion", "created": int(time.time()),
            "model": model_id}


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


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
        return JSONResponse(self.body(), status_code=self.status)


async def api_error(_: Request, e: APIError) -> JSONResponse:
    return e.response()


async def invalid(_: Request, e: RequestValidationError) -> JSONResponse:
    error = e.errors()[0]
    if error["type"] == "json_invalid":
        return APIError(400, "We could not parse the JSON body of your request.").response()
    param = str(error["loc"][1]) if len(error["loc"]) > 1 else None  # ("body", field, ...)
    return APIError(422, f"{param or 'body'}: {error['msg']}", param, code="invalid_value").response()


async def http_error(request: Request, e: HTTPException) -> JSONResponse:
    no_route = e.status_code in (404, 405)
    message = f"no route {request.method} {request.url.path}" if no_route else str(e.detail)
    return APIError(e.status_code, message, code="not_found" if e.status_code == 404 else None).response()


def answer_errors_in_openai_shape(app: FastAPI) -> None:
    """Make `app` answer APIError, and FastAPI's own errors, in OpenAI's shape."""
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)
