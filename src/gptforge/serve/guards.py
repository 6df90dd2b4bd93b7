"""What a request must pass before a route sees it: a deadline to arrive, the body size limit and the API key.

`GuardedH11Protocol` is uvicorn's HTTP protocol with a deadline (a connection too slow to send its request is
closed) that answers bytes which are no HTTP request in OpenAI's shape too; `BodyLimit` is ASGI middleware
(413 for a body too large), `bearer_check` a FastAPI dependency (401 for a wrong or missing key). All answer
with api.py's APIError. Which routes they guard is app.py's choice; server.py runs uvicorn with the protocol.
"""

import asyncio
import hashlib
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import h11
from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from gptforge.serve.api import APIError


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, where a connection has `request_timeout` seconds, from its opening or from its
    last response, to deliver its next request, headers and body; then it is closed. (uvicorn's keep-alive
    timer stops at a request's first byte, so alone it lets a client that sends half a request, or trickles
    one a byte at a time, hold the connection forever.) The clock stops once a request is in: a response
    that takes minutes to stream is not cut. Bytes that are no HTTP request get a JSON 400, not uvicorn's
    plain text."""

    def __init__(self, *args: Any, request_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.request_timeout = request_timeout
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.watch()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self.watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.watch()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        super().connection_lost(exc)

    def watch(self) -> None:
        """Run the clock while a request is due (none or part of it received); stop it once it is in."""
        due = self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing()
        if due and self.deadline is None:
            self.deadline = self.loop.call_later(self.request_timeout, self.transport.close)
        elif not due and self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to bytes that are no HTTP/1.1 request (then it closes), in OpenAI's shape."""
        response = APIError(400, f"{msg} This server speaks HTTP/1.1.").response()
        headers = [*response.raw_headers, (b"connection", b"close")]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                      h11.Data(data=response.body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


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
    """A dependency that requires `Authorization: Bearer <api_key>`, compared in constant time (digests of
    equal length, so not even the key's length leaks); no check when there is no key."""
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
