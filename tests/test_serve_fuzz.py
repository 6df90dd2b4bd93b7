"""A fuzz test of `gptforge serve`'s HTTP side (gptforge.serve), against a real uvicorn server on 127.0.0.1: a
bounded, seeded set of bad requests (every field given every wrong type, huge, negative and non-finite
numbers, nested garbage, bytes that are no JSON or no UTF-8, unknown fields, long stop lists, wrong methods
and paths, bytes that are no HTTP) where every answer must be a 2xx or an OpenAI-shaped JSON 4xx, never a
5xx, never a body of another kind, never a dropped connection; and the server must still answer a valid
request the same way at the end. About 550 requests, a few seconds.

    .venv/bin/python -m pytest tests/test_serve_fuzz.py
"""

import gzip
import json
import random
import socket
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from mirror_data import needs_mirror
from test_serve import connection_of, error_of, server, tiny_hf_dir

from gptforge.serve.api import CompletionRequest

pytestmark = needs_mirror

VALID = {"prompt": "The meaning of life is", "max_tokens": 2}

# values of every JSON type and of awkward sizes: each field gets each of them
ODD = [
    None, True, 0, -1, 2, 0.5, 5e-324, 1e308, -(10**30), 2**63, "", "16", "\u0000", "é" * 40, [], [1, 2],
    ["a"] * 40, {}, {"a": {"b": [{}]}}, [[[[[]]]]],
]

# bodies that are no JSON object of the right shape, or no JSON, or no UTF-8
RAW = [
    b"", b" ", b"null", b"true", b"0", b'"prompt"', b"[]", b'[{"prompt": "hi"}]', b"{", b'{"prompt": "hi"',
    b'{"prompt": "hi"}}', b'{"prompt": "hi",}', b"{'prompt': 'hi'}", b'{prompt: "hi"}',
    b'{"prompt": "hi"} {}', b'{"prompt": NaN}', b'{"prompt": "hi", "temperature": NaN}',
    b'{"prompt": "hi", "top_p": Infinity}', b'{"prompt": "hi", "temperature": -Infinity}',
    b'{"prompt": "hi", "max_tokens": 1e999}', b'{"prompt": "hi", "max_tokens": 02}',
    b'{"prompt": "hi", "max_tokens": 0x10}', b'{"prompt": "hi", "n": +1}',
    b'{"prompt": "hi", "max_tokens": 1.}',
    b'{"prompt": "hi", "seed": -0}', b'{"prompt": "hi", "prompt": 5}', b'\xef\xbb\xbf{"prompt": "hi"}',
    '{"prompt": "hi"}'.encode("utf-16"), '{"prompt": "hi"}'.encode("utf-32"), b"\xff" * 10, b"\x00" * 10,
    b'{"prompt": "\\ud800"}', b'{"prompt": "\\udc00\\ud800"}', b'{"prompt": "\\u"}', b'{"prompt": "\\x41"}',
    b'{"prompt": "\xc3"}', b'{"prompt": "\xed\xa0\x80"}', b'{"prompt": "\xf4\x90\x80\x80"}',
    b'{"prompt": "tab\there"}', b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000,
    b'{"prompt": "hi", "' + b"k" * 5000 + b'": 1}', b'{"prompt": "' + b"a" * 60000 + b'"}', b"x" * 70000,
    b'{"prompt": "hi", "stop": [' + b'"s",' * 500 + b'"s"]}', b'{"prompt": [' + b'"p",' * 500 + b'"p"]}',
    b'{"prompt": "hi", "logit_bias": {' + b",".join(b'"%d": 1' % i for i in range(500)) + b"}}",
    gzip.compress(json.dumps(VALID).encode()),
]

CONTENT_TYPES = [
    None, "application/json", "text/plain", "application/x-www-form-urlencoded", "image/png",
    "application/json; charset=latin-1", "multipart/form-data", "application/json" + "; x=y" * 200,
]

# (method, path) that name no route, or the wrong method of one
ROUTES = [
    ("GET", "/v1/completions"), ("PUT", "/v1/completions"), ("DELETE", "/v1/completions"),
    ("PATCH", "/v1/completions"), ("OPTIONS", "/v1/completions"), ("TRACE", "/v1/completions"),
    ("POST", "/health"), ("PUT", "/health"), ("POST", "/v1/models"), ("DELETE", "/"), ("POST", "/"),
    ("POST", "/v1/completions/"), ("GET", "/v1/chat/completions"), ("POST", "/v1/chat/completions/"),
    ("POST", "/v1/chat"), ("POST", "/v1//completions"),
    ("POST", "/V1/COMPLETIONS"), ("GET", "/nothing"), ("GET", "/%ED%A0%80"), ("GET", "/%00"), ("GET", "/%"),
    ("GET", "/v1/../v1/models"), ("GET", "/" + "a" * 4000), ("GET", "/v1/models?" + "q=%FF&" * 100),
    ("GET", "/health?x=\u00ff"), ("BREW", "/"),
]


def greedy(url: str) -> str:
    response = httpx.post(f"{url}/v1/completions", json={**VALID, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200
    return response.json()["choices"][0]["text"]


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, Any, str]]:
    """The server, and its greedy completion before any fuzz."""
    model_dir = tiny_hf_dir(tmp_path_factory.mktemp("fuzz") / "tiny-gpt2")
    with server(model_dir, max_request_bytes=65536) as (url, app):
        yield url, app, greedy(url)


def fuzzed_bodies(seed: int, count: int) -> Iterator[dict[str, Any]]:
    """Valid requests with 1 to 4 fields set to odd values, unknown fields and garbage nested in them."""
    rng = random.Random(seed)
    fields = [*CompletionRequest.model_fields, "unknown", "", "__proto__", "prompt\u0000", "Prompt"]

    def garbage(depth: int) -> Any:
        if depth == 0 or rng.random() < 0.4:
            return rng.choice(ODD)
        if rng.random() < 0.5:
            return [garbage(depth - 1) for _ in range(rng.randrange(4))]
        return {rng.choice(fields): garbage(depth - 1) for _ in range(rng.randrange(4))}

    for _ in range(count):
        body: dict[str, Any] = dict(VALID)
        for field in rng.sample(fields, rng.randrange(1, 5)):
            body[field] = garbage(rng.randrange(4))
        yield body


def problem(response: httpx.Response) -> str | None:
    """What is wrong with an answer, if anything: it must be a 2xx, or a 4xx in OpenAI's JSON shape."""
    status, kind = response.status_code, response.headers.get("content-type", "")
    if "close" in response.headers.get("connection", ""):
        return f"{status} closes the connection"
    if 200 <= status < 300:
        if kind == "text/event-stream; charset=utf-8":
            return None if response.text.endswith("data: [DONE]\n\n") else "a stream without [DONE]"
        if kind == "application/json":
            return None if isinstance(response.json(), dict) else "a body that is no JSON object"
        return f"{status} of type {kind!r}"
    if not 400 <= status < 500:
        return f"status {status}: {response.text[:200]!r}"
    try:
        error_of(response, status)
    except (AssertionError, ValueError) as e:  # ValueError: a body that is no JSON
        return f"{status} not in OpenAI's shape: {e}"
    return None


def check_all(client: httpx.Client, requests: list[tuple[str, str, bytes, dict[str, str]]]) -> None:
    """Send every request on one connection: each answer sound, and the connection the same throughout."""
    connection, problems = None, []
    for method, path, content, headers in requests:
        response = client.request(method, path, content=content, headers=headers)
        connection = connection or connection_of(response)
        why = problem(response)
        if why is None and connection_of(response) != connection:
            why = "a new connection: the server dropped the last one"
        if why is not None:
            problems.append(f"{method} {path[:80]} {content[:80]!r} {headers}: {why}")
    assert not problems, "\n".join(problems)


def post(body: Any, content_type: str | None = "application/json") -> tuple[str, str, bytes, dict[str, str]]:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return "POST", "/v1/completions", content, {} if content_type is None else {"content-type": content_type}


def test_every_field_with_every_odd_value(served):
    requests = [post({**VALID, field: value}) for field in CompletionRequest.model_fields for value in ODD]
    with httpx.Client(base_url=served[0], timeout=30) as client:
        check_all(client, requests)


def test_random_garbage_in_valid_requests(served):
    with httpx.Client(base_url=served[0], timeout=30) as client:
        check_all(client, [post(body) for body in fuzzed_bodies(seed=0, count=80)])


def test_bodies_that_are_no_json_and_any_content_type(served):
    requests = [post(raw) for raw in RAW]
    for body in (VALID, b"", b"prompt=hi&max_tokens=2", b'{"prompt": "\\ud800"}', b'{"prompt": NaN}'):
        requests += [post(body, content_type) for content_type in CONTENT_TYPES]
    with httpx.Client(base_url=served[0], timeout=30) as client:
        check_all(client, requests)


def test_wrong_methods_and_paths(served):
    requests = [(method, path, content, {"content-type": "application/json"}) for method, path in ROUTES
                for content in (b"", json.dumps(VALID).encode())]
    with httpx.Client(base_url=served[0], timeout=30) as client:
        check_all(client, requests)


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS hello
    b"GET / HTTP/1.1\r\n\r\n",  # no Host
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n",
    b"GET /\xff HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX: " + b"a" * 17_000,  # headers over h11's 16 KiB, unfinished
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhi",
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
], ids=["garbage", "tls", "no host", "bad header", "non-ascii path", "huge header", "length abc", "length -1",
        "two lengths", "bad chunk"])
def test_bytes_that_are_no_http_get_a_json_400(served, raw):
    with socket.create_connection(("127.0.0.1", int(served[0].rsplit(":", 1)[1]))) as sock:
        sock.settimeout(10)
        sock.sendall(raw)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"content-type: application/json" in head.lower()
    assert json.loads(body)["error"]["type"] == "invalid_request_error"


def test_the_server_answers_the_same_after_all_of_it(served):
    """Last in this module (pytest keeps the file's order): the fuzz left the server as it found it."""
    url, _, before = served
    assert greedy(url) == before
    health = httpx.get(f"{url}/health").json()
    assert (health["status"], health["busy"], health["waiting"]) == ("ok", 0, 0)

