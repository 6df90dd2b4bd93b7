"""What a request must pass before a route sees it: the body size limit and the API key.

`BodyLimit` is ASGI middleware (413 for a body too large), `bearer_check` a FastAPI dependency (401 for a
wrong or missing key); both answer with api.py's APIError. Which routes they guard is app.py's choice.
"""

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gptforge.serve.api import APIError


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
