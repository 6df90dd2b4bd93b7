"""Tests for `gptforge serve`'s API (gptforge.serve.app), against a real uvicorn server on 127.0.0.1 serving
a tiny random Hugging Face GPT-2 with the GPT-2 tokenizer: completions whole and streamed, n, prompt lists,
stop strings, seeds, every error status, the API key, disconnects, 16 streaming clients at once and the
playground page; and what real clients and hostile ones send: text that is not text, coerced types, any
Content-Type, underflowing temperatures, HEAD, clients that stall half-way through a request.

    .venv/bin/python -m pytest tests/test_serve.py
"""

import contextlib
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from mirror_data import needs_mirror

from gptforge.serve.api import APIError
from gptforge.serve.app import create_app
from gptforge.serve.engine import Engine
from gptforge.serve.server import ServeOptions, serve_in_thread
from gptforge.source import load_source

pytestmark = needs_mirror

BLOCK_SIZE = 128


def tiny_hf_dir(directory: Path) -> Path:
    """A random 2-layer GPT-2 with the full GPT-2 vocabulary, saved as transformers saves it. A wide
    initialisation makes its next-token distributions peaked, so its text depends on the prompt."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=BLOCK_SIZE,
                                     initializer_range=0.5)
    transformers.GPT2LMHeadModel(config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.mktemp("serve") / "tiny-gpt2")


@contextlib.contextmanager
def server(model_dir: Path, **options: Any) -> Iterator[tuple[str, Any]]:
    """The base URL and app of a server on a free loopback port."""
    opts = ServeOptions(init_from=str(model_dir), **{"max_batch": 4, "max_queue": 16, "max_tokens_limit": 100,
                                                      "max_request_bytes": 2000, **options})
    source = load_source(opts.init_from)
    engine = Engine(source.model.eval(), source.tokenizer, opts.max_batch, opts.max_queue,
                    opts.batch_invariant)
    app = create_app(engine, "tiny-gpt2", opts)
    with serve_in_thread(app, request_timeout=opts.request_timeout) as url:
        yield url, app


@pytest.fixture(scope="module")
def served(model_dir) -> Iterator[tuple[str, Any]]:
    with server(model_dir) as running:
        yield running


@pytest.fixture
def client(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=60) as client:
        yield client


def complete(client: httpx.Client, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/completions", json={"prompt": "The meaning of life is", **body})
    assert response.status_code == 200, response.text
    return response.json()


def stream(client: httpx.Client, **body: Any) -> list[Any]:
    """The decoded `data:` payloads of a streamed completion, "[DONE]" as a string."""
    events = []
    with client.stream("POST", "/v1/completions",
                       json={"prompt": "The meaning of life is", "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def streamed_texts(events: list[Any]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for event in events[:-1]:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    assert [(m["id"], m["object"], m["owned_by"], m["max_model_len"], m["chat"]) for m in models["data"]] == [
        ("tiny-gpt2", "model", "gptforge", BLOCK_SIZE, False)]  # a base model: no chat template
    assert client.get("/health").json() == {"status": "ok", "model": "tiny-gpt2", "chat": False, "busy": 0,
                                            "waiting": 0, "slots": 4}


def test_a_greedy_completion_is_the_models_argmax_continuation(client, model_dir):
    result = complete(client, max_tokens=12, temperature=0, model="tiny-gpt2")
    assert result["object"] == "text_completion" and result["id"].startswith("cmpl-")
    assert result["model"] == "tiny-gpt2" and isinstance(result["created"], int)
    [choice] = result["choices"]
    assert (choice["index"], choice["finish_reason"], choice["logprobs"]) == (0, "length", None)
    source = load_source(str(model_dir))
    ids = source.tokenizer.encode("The meaning of life is")
    with torch.inference_mode():
        expected = source.model.eval().generate(torch.tensor([ids]), 12, temperature=0)[0, len(ids):]
    assert choice["text"] == source.tokenizer.decode(expected.tolist())
    assert result["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 12,
                               "total_tokens": len(ids) + 12}


def test_streaming_gives_the_text_of_the_whole_completion(client):
    whole = complete(client, max_tokens=20, seed=7)
    events = stream(client, max_tokens=20, seed=7, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert all(chunk["id"] == usage["id"] and chunk["object"] == "text_completion" for chunk in chunks)
    assert len(chunks) > 5  # streamed piece by piece, not in one go
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert streamed_texts(events) == {0: whole["choices"][0]["text"]}
    assert "usage" not in stream(client, max_tokens=3)[-2]  # only when asked for


def test_n_samples_and_prompt_lists(client):
    three = complete(client, n=3, seed=1, max_tokens=16)["choices"]
    assert [c["index"] for c in three] == [0, 1, 2] and len({c["text"] for c in three}) == 3
    # choice c of seed s draws as choice 0 of seed s + c, whether sent together, alone or streamed
    assert [complete(client, seed=1 + i, max_tokens=16)["choices"][0]["text"] for i in range(3)] == [
        c["text"] for c in three]
    assert streamed_texts(stream(client, n=3, seed=1, max_tokens=16)) == {
        c["index"]: c["text"] for c in three}
    listed = complete(client, prompt=["Once upon a time", "The meaning of life is"], n=2, seed=5,
                      max_tokens=8)
    assert [c["index"] for c in listed["choices"]] == [0, 1, 2, 3]
    assert listed["choices"][2]["text"] == complete(client, seed=7, max_tokens=8)["choices"][0]["text"]
    assert listed["usage"]["prompt_tokens"] == 4 + 5 and listed["usage"]["completion_tokens"] == 4 * 8


def test_seeds(client):
    first, again = (complete(client, seed=42, max_tokens=24)["choices"][0]["text"] for _ in range(2))
    assert first == again
    assert complete(client, seed=43, max_tokens=24)["choices"][0]["text"] != first
    unseeded = {complete(client, max_tokens=24)["choices"][0]["text"] for _ in range(3)}
    assert len(unseeded) == 3


def test_stop_strings_cut_the_text_before_them(client):
    text = complete(client, temperature=0, max_tokens=40)["choices"][0]["text"]
    stop = text[10:14]
    cut = text[: text.index(stop)]
    result = complete(client, temperature=0, max_tokens=40, stop=stop)["choices"][0]
    assert (result["text"], result["finish_reason"]) == (cut, "stop")
    events = stream(client, temperature=0, max_tokens=40, stop=["never in this text", stop])
    assert streamed_texts(events) == {0: cut} and events[-2]["choices"][0]["finish_reason"] == "stop"


def test_sixteen_streaming_clients_at_once(client, served):
    """16 concurrent streams through 4 slots: each gets exactly the text and the logprobs (bit for bit) its
    seed gives alone."""
    def choice(result: dict[str, Any]) -> tuple[str, str, list[float]]:
        [first] = result["choices"]
        return first["text"], first["finish_reason"], first["logprobs"]["token_logprobs"]

    alone = {seed: choice(complete(client, seed=seed, max_tokens=24, logprobs=2)) for seed in range(16)}

    def one(seed: int) -> tuple[str, str, list[float]]:
        with httpx.Client(base_url=served[0], timeout=60) as own:
            events = stream(own, seed=seed, max_tokens=24, logprobs=2)
        assert events[-1] == "[DONE]"
        logprobs = [lp for event in events[:-1] for lp in event["choices"][0]["logprobs"]["token_logprobs"]]
        return streamed_texts(events)[0], events[-2]["choices"][0]["finish_reason"], logprobs

    with ThreadPoolExecutor(16) as pool:
        together = dict(zip(range(16), pool.map(one, range(16)), strict=True))
    assert together == alone
    assert client.get("/health").json()["busy"] == 0


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error of a `status` answer, which must be JSON in OpenAI's shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["message"]
    return error


@pytest.mark.parametrize(("body", "status", "param", "message"), [
    ({"max_tokens": 101}, 400, "max_tokens", "above this server's limit of 100"),
    ({"prompt": "word " * 120, "max_tokens": 16}, 400, "max_tokens", "maximum context length is 128 tokens"),
    ({"n": 5}, 400, "n", "between 1 and 4"),
    ({"prompt": []}, 400, "prompt", "empty list"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 stop strings"),
    ({"suffix": " the end"}, 400, "suffix", "not supported"),
    ({"logprobs": 6}, 400, "logprobs", "at most 5"),
    ({"best_of": 2, "n": 3}, 400, "best_of", "at least n"),
    ({"best_of": 5}, 400, "best_of", "between 1 and 4"),
    ({"best_of": 2, "stream": True}, 400, "best_of", "cannot stream"),
    ({"logit_bias": {"50257": -100}}, 400, "logit_bias", "no token id"),
    ({"logit_bias": {"-1": 1}}, 400, "logit_bias", "no token id"),
    ({"logit_bias": {"50256": -100.5}}, 400, "logit_bias", "between -100 and 100"),
    ({"prompt": [50257]}, 400, "prompt", "the token id 50257, which is not in this model's vocabulary"),
    ({"prompt": [[1, 2], [-1]]}, 400, "prompt", "prompt[1] has the token id -1"),
    ({"prompt": [[1, 2], []]}, 400, "prompt", "prompt[1] is an empty list"),
    ({"presence_penalty": 2.5}, 422, "presence_penalty", "less than or equal to 2"),
    ({"frequency_penalty": -3}, 422, "frequency_penalty", "greater than or equal to -2"),
    ({"logprobs": -1}, 422, "logprobs", "greater than or equal to 0"),
    ({"max_tokens": -1}, 422, "max_tokens", "greater than or equal to 0"),
    ({"model": "gpt-4"}, 404, "model", "does not exist"),
    ({"temperature": 2.5}, 422, "temperature", "less than or equal to 2"),
    ({"max_tokens": "many"}, 422, "max_tokens", "valid integer"),
    ({"top_p": 0}, 422, "top_p", "greater than 0"),
    ({"seed": -1}, 422, "seed", "greater than or equal to 0"),
    ({"prompt": 7}, 422, "prompt", "valid string"),
    ({"prompt": None}, 422, "prompt", "valid string"),
    ({"best_of_n": 2}, 422, "best_of_n", "Extra inputs are not permitted"),
])
def test_bad_requests_get_openai_errors(client, body, status, param, message):
    error = error_of(client.post("/v1/completions", json={"prompt": "hi", **body}), status)
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"


def test_malformed_and_oversized_bodies_and_unknown_routes(client):
    error = error_of(client.post("/v1/completions", content=b"{not json",
                                 headers={"content-type": "application/json"}), 400)
    assert "parse the JSON body" in error["message"]
    big = {"prompt": "x" * 3000}
    assert error_of(client.post("/v1/completions", json=big), 413)["code"] == "request_too_large"
    # no Content-Length: counted as it comes
    chunked = (part for part in (b'{"prompt": "', b"x" * 3000, b'"}'))
    assert error_of(client.post("/v1/completions", content=chunked), 413)["code"] == "request_too_large"
    assert error_of(client.get("/v1/nothing"), 404)["code"] == "not_found"
    assert error_of(client.get("/v1/completions"), 405)["message"] == "no route GET /v1/completions"


def test_the_api_key_guards_v1_only(model_dir):
    with server(model_dir, api_key="s3cret-key") as (url, _), httpx.Client(base_url=url) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
            error = error_of(client.get("/v1/models", headers=headers), 401)
            assert error["code"] == "invalid_api_key"
            error_of(client.post("/v1/completions", json={"prompt": "hi"}, headers=headers), 401)
        good = {"Authorization": "Bearer s3cret-key"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                           headers=good).status_code == 200
        assert client.get("/health").status_code == 200 and client.get("/").status_code == 200


def health_within(client: httpx.Client, check: Callable[[dict[str, Any]], bool], within: float) -> float:
    """Seconds until /health satisfies `check`; fails after `within` seconds."""
    start = time.monotonic()
    while not check(client.get("/health").json()):
        assert time.monotonic() - start < within, "the server did not get there in time"
        time.sleep(0.005)
    return time.monotonic() - start


@contextlib.contextmanager
def slow_steps(app: Any, seconds: float) -> Iterator[None]:
    """Make every forward of the app's model take at least `seconds`, so that a request outlasts the
    test's moves."""
    engine = app.state.engine
    model_forward = engine.model.forward

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(seconds)
        return model_forward(*args, **kwargs)

    engine.model.forward = slow
    try:
        yield
    finally:
        del engine.model.forward


# greedy from "a", the tiny model writes 100 tokens without an end-of-text: a request that takes all its steps
LONG = {"prompt": "a", "max_tokens": 100, "temperature": 0, "stream": True}


def test_a_full_queue_answers_429(model_dir):
    with (
        server(model_dir, max_batch=1, max_queue=1) as (url, app),
        slow_steps(app, 0.05),  # 100 tokens take over 5 seconds
        httpx.Client(base_url=url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=LONG) as r,
        ThreadPoolExecutor(1) as pool,
    ):
        lines = r.iter_lines()  # held: dropping it would close the connection
        next(lines)  # decoding: the one slot is taken
        waiting = pool.submit(client.post, "/v1/completions", json={"prompt": "b", "max_tokens": 2})
        health_within(client, lambda health: health["waiting"] == 1, 5)
        busy = client.post("/v1/completions", json={"prompt": "c"})
        error = error_of(busy, 429)
        assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full")
        assert busy.headers["retry-after"] == "1"
        r.close()  # frees the slot: the waiting request runs
        assert waiting.result().status_code == 200


def test_a_draining_server_answers_503(client, served):
    app = served[1]
    app.state.draining = True
    try:
        assert error_of(client.post("/v1/completions", json={"prompt": "hi"}), 503)["code"] == "shutting_down"
        assert client.get("/health").status_code == 503 and client.head("/health").status_code == 503
    finally:
        app.state.draining = False


def test_a_client_that_disconnects_frees_its_slots_at_once(client, served):
    url, app = served
    with slow_steps(app, 0.02):  # 100 tokens take over 2 seconds
        with httpx.Client(base_url=url, timeout=60) as own, own.stream(
            "POST", "/v1/completions", json={**LONG, "n": 2}
        ) as r:
            lines = r.iter_lines()  # held: dropping it would close the connection
            next(lines)
            assert client.get("/health").json()["busy"] == 2
        assert health_within(client, lambda health: health["busy"] == 0, 2) < 0.5

        def post_and_leave() -> None:
            with contextlib.suppress(httpx.ReadTimeout):
                httpx.post(f"{url}/v1/completions", json={**LONG, "stream": False}, timeout=0.5)

        thread = threading.Thread(target=post_and_leave)
        thread.start()
        health_within(client, lambda health: health["busy"] == 1, 2)
        thread.join()  # the non-streaming client gave up after 0.5 s and closed its connection
        assert health_within(client, lambda health: health["busy"] == 0, 2) < 0.5


def test_the_playground_page_is_self_contained(client):
    response = client.get("/")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in response.headers["content-security-policy"]
    page = response.text
    assert 'id="generate"' in page and "/v1/completions" in page and "getReader" in page
    assert "http://" not in page and "https://" not in page  # nothing fetched from elsewhere


def connection_of(response: httpx.Response) -> tuple[str, int]:
    """The client's end of the connection that carried `response`: equal for two responses, one connection."""
    return response.extensions["network_stream"].get_extra_info("client_addr")


@pytest.mark.parametrize("body", [
    b'{"prompt": "\\ud800"}',
    b'{"prompt": "a\\udfffb"}',  # a lone trailing surrogate
    b'{"prompt": "\\ud83d\\u0041"}',  # a leading one followed by something else
    b'{"prompt": ["fine", "\\udbff"]}',
    b'{"prompt": "hi", "stop": "\\ud800"}',
    b'{"prompt": "hi", "model": "\\ud800"}',  # a field echoed back in the error message
    b'{"prompt": "hi", "user": "\\ud800"}',
    b'{"prompt": "hi", "\\ud800": 1}',  # an unknown field named in the error message
    b'{"prompt": "hi", "logit_bias": {"\\ud800": 1}}',
    b'{"prompt": "\xed\xa0\x80"}',  # a surrogate in UTF-8's form: not UTF-8
    b'{"prompt": "\xff\xfe"}',
    '{"prompt": "hi"}'.encode("utf-16"),
    b'{"prompt": "a\x00b"}',  # a raw control character in a string
])
def test_text_that_is_no_text_is_a_400_and_the_connection_lives(client, body):
    """Any bytes a client sends get an OpenAI-shaped answer and leave its keep-alive connection working."""
    bad = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
    assert "could not parse the JSON body" in error_of(bad, 400)["message"]
    good = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert good.status_code == 200 and connection_of(good) == connection_of(bad)


@pytest.mark.parametrize("prompt", [
    "\U0001f600 an emoji", "\uffff\ufffe noncharacters", "\u202e right-to-left", "\x00 NUL",
    "\u0301 a lone mark", "\U0010ffff",
])
@pytest.mark.parametrize("ascii_only", [True, False])  # True: the emoji as "\\ud83d\\ude00", a surrogate pair
def test_any_unicode_text_is_a_200(client, prompt, ascii_only):
    body = json.dumps({"prompt": prompt, "max_tokens": 2, "stop": prompt}, ensure_ascii=ascii_only)
    first = client.post("/v1/completions", content=body.encode())
    second = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "user": prompt})
    assert first.status_code == second.status_code == 200, first.text
    assert connection_of(first) == connection_of(second)


def texts(client: httpx.Client, **body: Any) -> list[str]:
    return [c["text"] for c in complete(client, max_tokens=24, **body)["choices"]]


@pytest.mark.parametrize("sampling", [
    {"temperature": 1e-40},  # a float32 subnormal: the logits divided by it overflow
    {"temperature": 1e-300},  # 0 in float32
    {"temperature": 5e-324},  # the smallest float64
    {"temperature": 1e-40, "top_p": 0.5, "top_k": 5},
    {"top_p": 1e-300},  # below float32: no token's mass reaches it
    {"top_p": 1e-45},
    {"top_p": 1e-300, "top_k": 1},
])
def test_underflowing_temperature_or_top_p_is_greedy(client, sampling):
    greedy = texts(client, temperature=0)[0]
    assert texts(client, seed=3, n=2, **sampling) == [greedy, greedy]
    assert streamed_texts(stream(client, seed=4, max_tokens=24, **sampling)) == {0: greedy}


@pytest.mark.parametrize(("field", "value", "message"), [
    ("stream", "yes", "valid boolean"),
    ("stream", 1, "valid boolean"),
    ("echo", 0, "valid boolean"),
    ("max_tokens", True, "valid integer"),
    ("max_tokens", 2.0, "valid integer"),
    ("max_tokens", "2", "valid integer"),
    ("n", 1.5, "valid integer"),
    ("seed", "1", "valid integer"),
    ("top_k", False, "valid integer"),
    ("logprobs", True, "valid integer"),
    ("temperature", "0.5", "valid number"),
    ("temperature", True, "valid number"),
    ("top_p", [1], "valid number"),
    ("presence_penalty", "0", "valid number"),
    ("prompt", ["a", 1], "valid string"),
    ("prompt", {"text": "a"}, "valid string"),
    ("stop", 5, "valid string"),
    ("stop", ["a", None], "valid string"),
    ("model", 1, "valid string"),
    ("user", False, "valid string"),
    ("stream_options", {"include_usage": "true"}, "valid boolean"),
    ("stream_options", {"include_usage": True, "extra": 1}, "Extra inputs are not permitted"),
    ("logit_bias", {"50256": "1"}, "valid number"),
])
def test_types_are_strict_as_openais(client, field, value, message):
    error = error_of(client.post("/v1/completions", json={"prompt": "hi", field: value}), 422)
    assert error["param"] == field and message in error["message"] and error["code"] == "invalid_value"


def test_an_integer_is_a_number_and_nan_is_none(client):
    assert complete(client, temperature=1, top_p=1, presence_penalty=0, max_tokens=2)["choices"]
    for field in ("temperature", "top_p", "frequency_penalty"):
        for number in ("NaN", "Infinity", "-Infinity", "1e999"):
            body = f'{{"prompt": "hi", "{field}": {number}}}'.encode()
            error = error_of(client.post("/v1/completions", content=body), 422)
            assert error["param"] == field and "finite number" in error["message"]


@pytest.mark.parametrize("content_type", [
    None, "application/x-www-form-urlencoded", "text/plain", "application/json; charset=utf-8",
    "application/octet-stream", "multipart/form-data; boundary=x", "nonsense/",
])
def test_a_json_body_is_json_whatever_its_content_type(client, content_type):
    """`curl -d` sends application/x-www-form-urlencoded; clients without a Content-Type exist too."""
    body = json.dumps({"prompt": "The meaning of life is", "max_tokens": 8, "temperature": 0}).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    response = client.post("/v1/completions", content=body, headers=headers)
    assert response.status_code == 200, response.text
    greedy = complete(client, max_tokens=8, temperature=0)["choices"][0]["text"]
    assert response.json()["choices"][0]["text"] == greedy


def test_a_form_is_no_json_and_the_error_says_so(client):
    form = client.post("/v1/completions", data={"prompt": "hi", "max_tokens": "2"})
    assert "could not parse the JSON body" in error_of(form, 400)["message"]


def test_head_health_and_every_429_says_when_to_retry(client):
    head = client.head("/health")
    assert (head.status_code, head.content, head.headers["content-type"]) == (200, b"", "application/json")
    assert client.get("/health").json()["status"] == "ok"
    assert client.head("/v1/completions").status_code == 405
    assert APIError(429, "busy").response().headers["retry-after"] == "1"  # every 429 is an APIError's
    assert "retry-after" not in APIError(400, "bad").response().headers


def test_a_bug_is_still_a_json_500(client, served, monkeypatch):
    def broken() -> dict[str, int]:
        raise RuntimeError("a bug")

    monkeypatch.setattr(served[1].state.engine, "occupancy", broken)
    failed = client.get("/health")
    error = error_of(failed, 500)
    assert error["type"] == "server_error" and "RuntimeError" in error["message"]
    assert failed.headers["connection"] == "close"  # the server closes it: the client must not reuse it
    monkeypatch.undo()
    assert client.get("/health").status_code == 200


def closed_within(sock: socket.socket, seconds: float) -> tuple[float, bytes]:
    """Seconds until the server closes `sock`, and what it sent until then; fails after `seconds`."""
    start, received = time.monotonic(), b""
    sock.settimeout(seconds)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(4096):
            received += chunk
    return time.monotonic() - start, received


@pytest.fixture(scope="module")
def impatient(model_dir) -> Iterator[tuple[str, Any]]:
    """A server whose clients have half a second to send each request."""
    with server(model_dir, request_timeout=0.5) as running:
        yield running


@pytest.mark.parametrize("sent", [
    b"",
    b"POST /v1/comp",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n",
    b'POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 50\r\n\r\n{"prompt": ',
    b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n",
    b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",  # answered, then idle
], ids=["nothing", "half a request line", "headers never ended", "half a body", "half a chunked body",
        "idle after a response"])
def test_a_client_that_stalls_is_cut_off(impatient, sent):
    url, _ = impatient
    with socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as stalled:
        stalled.sendall(sent)
        seconds, received = closed_within(stalled, 5)
    assert 0.4 < seconds < 2
    assert received.startswith(b"HTTP/1.1 200 OK") if sent.endswith(b"\r\n\r\n") else received == b""
    assert httpx.get(f"{url}/health").status_code == 200


def test_a_request_trickled_byte_by_byte_is_cut_off_and_the_rest_is_served(impatient):
    url, app = impatient
    with (
        httpx.Client(base_url=url, timeout=10) as client,
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1]))) as trickle,
    ):
        start = time.monotonic()
        with pytest.raises(OSError):  # each byte resets uvicorn's keep-alive timer, not the deadline
            for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                trickle.sendall(bytes([byte]))
                time.sleep(0.05)
        assert time.monotonic() - start < 2
        # a connection idle for less than the timeout between requests is kept: each request restarts it
        first = client.get("/health")
        time.sleep(0.3)
        second = client.get("/health")
        time.sleep(0.3)
        third = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert first.status_code == second.status_code == third.status_code == 200
        assert connection_of(first) == connection_of(second) == connection_of(third)
        # a response that outlasts the timeout is not cut: the clock stops once the request is in
        with slow_steps(app, 0.02):
            started = time.monotonic()
            events = stream(client, **{**LONG, "max_tokens": 60})
        assert time.monotonic() - started > 1 and events[-1] == "[DONE]"
        assert streamed_texts(events)[0]
