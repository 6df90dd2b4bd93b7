"""The HTTP app of `gptforge serve`: its routes, and `create_app`, which wires an engine into them.

`/` is the playground page and `/health` the engine's occupancy (GET or HEAD), open to all; under `/v1`,
behind the API key, the model list and the model, the completions and the chat completions, whose work is
completions.py's and chat.py's. Routes read what they serve from `app.state`; the app starts and stops the
engine with its lifespan. The process around it (options, the socket, the signals that drain it) is
server.py's.
"""

import importlib.resources
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from gptforge.chat_template import ChatTemplate
from gptforge.serve.api import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    answer_errors_in_openai_shape,
    chat_request,
    completion_request,
    model_card,
)
from gptforge.serve.chat import Chat
from gptforge.serve.completions import Completions, check_model
from gptforge.serve.engine import Engine
from gptforge.serve.guards import BodyLimit, bearer_check

if TYPE_CHECKING:  # a type only: server.py, which defines it, imports this module
    from gptforge.serve.server import ServeOptions

PLAYGROUND_CSP = (  # the page may talk to this server only: no CDN, no other origin
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'"
)

site = APIRouter()  # no key: the page asks for one when the API needs it
v1 = APIRouter(prefix="/v1")


@site.get("/", response_class=HTMLResponse, include_in_schema=False)
async def playground(request: Request) -> HTMLResponse:
    return HTMLResponse(request.app.state.page, headers={"Content-Security-Policy": PLAYGROUND_CSP})


@site.api_route("/health", methods=["GET", "HEAD"])  # HEAD: what uptime checkers send
async def health(request: Request) -> JSONResponse:
    state = request.app.state
    body = {"status": "shutting down" if state.draining else "ok", "model": state.model_id,
            "chat": state.chat.template is not None, **state.engine.occupancy()}
    return JSONResponse(body, status_code=503 if state.draining else 200)


def card(request: Request) -> dict[str, Any]:
    state = request.app.state
    return model_card(state.model_id, state.created, state.engine.model.config.block_size,
                      state.chat.template is not None)


@v1.get("/models")
async def models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [card(request)]}


@v1.get("/models/{model_id:path}")  # the client's models.retrieve; an id may hold a slash
async def model(model_id: str, request: Request) -> dict[str, Any]:
    check_model(model_id, request.app.state.model_id)
    return card(request)


@v1.post("/completions", response_model=None)
async def completions(
    body: Annotated[CompletionRequest, Depends(completion_request)], request: Request
) -> JSONResponse | StreamingResponse:
    if request.app.state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    return await request.app.state.completions.respond(body, request)


@v1.post("/chat/completions", response_model=None)
async def chat_completions(
    body: Annotated[ChatCompletionRequest, Depends(chat_request)], request: Request
) -> JSONResponse | StreamingResponse:
    if request.app.state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    return await request.app.state.chat.respond(body, request)


def create_app(
    engine: Engine, model_id: str, opts: "ServeOptions", chat_template: ChatTemplate | None = None
) -> FastAPI:
    """The ASGI app around `engine`: it starts and stops the engine with its lifespan. `chat_template` renders
    chat requests (None: the model has none, and they are refused)."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop()

    # no redirect for a trailing slash: /v1/completions/ is a JSON 404, as at OpenAI, not a bodiless 307
    app = FastAPI(title="gptforge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None,
                  redirect_slashes=False)
    app.state.engine, app.state.model_id, app.state.created = engine, model_id, int(time.time())
    app.state.completions = Completions(engine, model_id, opts.max_tokens_limit)
    app.state.chat = Chat(engine, model_id, app.state.completions.max_tokens_limit, chat_template)
    page = importlib.resources.files("gptforge.serve") / "playground.html"
    app.state.page = page.read_text(encoding="utf-8")
    app.state.draining = False  # set when a signal starts the shutdown: new requests get 503
    app.add_middleware(BodyLimit, limit=opts.max_request_bytes)
    answer_errors_in_openai_shape(app)
    app.include_router(site)
    app.include_router(v1, dependencies=[Depends(bearer_check(opts.api_key))])
    return app
