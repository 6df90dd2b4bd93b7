"""Tests for `POST /v1/chat/completions` (gptforge.serve.chat), against a real uvicorn server on 127.0.0.1
serving a tiny finetuned run: a char model trained on a sonnet (tiny_run.py), finetuned with `gptforge sft` on
a few conversations so that its answers end at `<|end|>`. Driven by the unmodified `openai` client (whole and
streamed answers, n, stop, seeds, errors as its exceptions) and by raw HTTP for the exact wire format: answers
equal a direct greedy decode of the rendered prompt, seeded answers are the same alone and among others, the
chunks come in OpenAI's order, and a base model without a chat template says so.

    .venv/bin/python -m pytest tests/test_serve_chat.py
"""

import contextlib
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from test_serve import error_of, health_within, slow_steps
from test_serve_fuzz import ODD, check_all
from tiny_run import tiny_run

from gptforge.cli import main
from gptforge.serve.api import ChatCompletionRequest, ChatMessage, ContentPart
from gptforge.serve.app import create_app
from gptforge.serve.chat import NO_TEMPLATE
from gptforge.serve.engine import Engine
from gptforge.serve.server import ServeOptions, serve_in_thread
from gptforge.source import load_source

BLOCK_SIZE = 32  # tiny_run's context
LIMIT = 20  # the served max_tokens_limit: below the room a short prompt leaves
# the characters are the sonnet's: its char vocabulary has no "H", "?" is in it
CONVERSATIONS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Thee?"},
     {"role": "assistant", "content": "Thou art."}],
    [{"role": "user", "content": "So long"}, {"role": "assistant", "content": "lives this."}],
]
SO_LONG = [{"role": "user", "content": "So long"}]


def finetuned_run(root: Path) -> tuple[Path, Path]:
    """The base run (tiny_run) and its finetune under `root`: 20 steps of `gptforge sft` at a high learning
    rate, enough for greedy answers to end at the end-of-turn marker. A few seconds on a CPU."""
    base = tiny_run(root)
    data = root / "conversations.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS * 8), encoding="utf-8")
    out = root / "tiny-chat"
    assert main(["sft", f"--init_from={base}", f"--data={data}", f"--out_dir={out}", "--max_iters=20",
                 "--lr_decay_iters=20", "--warmup_iters=1", "--learning_rate=2e-2", "--device=cpu",
                 "--eval_interval=5", "--eval_iters=2", "--batch_size=4"]) == 0
    return base, out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    return finetuned_run(tmp_path_factory.mktemp("chat"))


@contextlib.contextmanager
def server(run: Path, model_id: str = "tiny-chat", **options: Any) -> Iterator[tuple[str, Any]]:
    """The base URL and app of a server of `run` on a free loopback port, with its chat template if any."""
    opts = ServeOptions(init_from=str(run), **{"max_batch": 4, "max_queue": 16, "max_tokens_limit": LIMIT,
                                                **options})
    source = load_source(opts.init_from)
    engine = Engine(source.model.eval(), source.tokenizer, opts.max_batch, opts.max_queue,
                    opts.batch_invariant)
    app = create_app(engine, model_id, opts, source.chat_template)
    with serve_in_thread(app, request_timeout=opts.request_timeout) as url:
        yield url, app


@pytest.fixture(scope="module")
def served(runs) -> Iterator[tuple[str, Any]]:
    with server(runs[1]) as running:
        yield running


@pytest.fixture
def http(served) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=60) as client:
        yield client


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def client(served) -> Iterator[openai.OpenAI]:
    with openai_client(served[0]) as client:
        yield client


def ask(client: openai.OpenAI, messages: list[dict[str, Any]] = SO_LONG, **options: Any) -> Any:
    return client.chat.completions.create(model="tiny-chat", messages=messages, **options)


def answer(client: openai.OpenAI, **options: Any) -> tuple[str, str]:
    [choice] = ask(client, **options).choices
    return choice.message.content, choice.finish_reason


def chat(http: httpx.Client, **body: Any) -> dict[str, Any]:
    response = http.post("/v1/chat/completions", json={"messages": SO_LONG, **body})
    assert response.status_code == 200, response.text
    return response.json()


def events(http: httpx.Client, **body: Any) -> list[Any]:
    """The decoded `data:` payloads of a streamed chat, "[DONE]" as a string."""
    payloads = []
    with http.stream("POST", "/v1/chat/completions", json={"messages": SO_LONG, "stream": True, **body}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line:
                assert line.startswith("data: ")
                data = line.removeprefix("data: ")
                payloads.append(data if data == "[DONE]" else json.loads(data))
    return payloads


def greedy_decode(run: Path, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, str, int, int]:
    """(text, finish_reason, prompt tokens, completion tokens) of the model's argmax answer, decoded
    directly from the rendered prompt, stopped at the template's end-of-turn id."""
    source = load_source(str(run))
    template = source.chat_template
    ids, _ = template.render(source.tokenizer, messages, add_generation_prompt=True)
    with torch.inference_mode():
        out = source.model.eval().generate(torch.tensor([ids]), max_tokens, temperature=0)[0, len(ids):]
    out = out.tolist()
    if template.end in out:
        cut = out.index(template.end)
        return source.tokenizer.decode(out[:cut]), "stop", len(ids), cut + 1
    return source.tokenizer.decode(out), "length", len(ids), max_tokens


def test_models_and_health_say_the_model_chats(http):
    [model] = http.get("/v1/models").json()["data"]
    assert (model["id"], model["chat"], model["max_model_len"]) == ("tiny-chat", True, BLOCK_SIZE)
    assert http.get("/health").json()["chat"] is True


def test_a_greedy_answer_is_the_direct_greedy_decode_up_to_the_end_marker(client, http, runs):
    text, reason, prompt_tokens, completion_tokens = greedy_decode(runs[1], SO_LONG, LIMIT)
    assert reason == "stop" and text  # the finetune learned to answer, and to end its turn
    result = ask(client, temperature=0, max_tokens=LIMIT)
    assert (result.object, result.model, result.id[:9]) == ("chat.completion", "tiny-chat", "chatcmpl-")
    [choice] = result.choices
    assert (choice.index, choice.message.role, choice.message.content, choice.finish_reason) == (
        0, "assistant", text, "stop")
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (
        prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)
    # the wire format itself: OpenAI's fields, nothing else
    raw = chat(http, temperature=0, max_tokens=LIMIT)
    assert set(raw) == {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert isinstance(raw["created"], int) and raw["system_fingerprint"].startswith("fp_")
    assert raw["choices"] == [{"index": 0, "message": {"role": "assistant", "content": text},
                               "logprobs": None, "finish_reason": "stop"}]
    # a conversation that goes on: an earlier exchange, its answer passed back as the client returned it
    thee = {"role": "user", "content": "Thee?"}
    first = ask(client, [thee], temperature=0, max_tokens=4).choices[0].message
    history = [thee, first, *SO_LONG]
    expected = greedy_decode(runs[1], [thee, {"role": "assistant", "content": first.content}, *SO_LONG], 6)
    assert answer(client, messages=history, temperature=0, max_tokens=6) == expected[:2]


def test_max_completion_tokens_or_max_tokens_and_the_default_is_all_the_room(client, served, runs):
    text, reason, _, _ = greedy_decode(runs[1], SO_LONG, 3)
    assert reason == "length"
    three = ask(client, temperature=0, max_completion_tokens=3)
    assert (three.choices[0].message.content, three.choices[0].finish_reason) == (text, "length")
    assert three.usage.completion_tokens == 3
    assert answer(client, temperature=0, max_tokens=3) == (text, "length")
    # neither: as long as the context's room (here 3 tokens, short of the answer) and the server's limit allow
    long = [{"role": "user", "content": "So long as men can breathe"}]
    text, reason, prompt_tokens, tokens = greedy_decode(runs[1], long, BLOCK_SIZE - 29)
    assert (prompt_tokens, reason) == (29, "length")
    default = ask(client, long, temperature=0)
    assert (default.choices[0].message.content, default.choices[0].finish_reason) == (text, "length")
    assert default.usage.completion_tokens == tokens == BLOCK_SIZE - 29
    budget = served[1].state.chat.max_tokens
    no_max = ChatCompletionRequest(messages=[])
    assert [budget(no_max, prompt) for prompt in (5, 12, 23, 31, 40)] == [LIMIT, LIMIT, 9, 1, 1]


def test_seeded_answers_are_the_same_alone_and_among_others(client, served):
    alone = {seed: answer(client, seed=seed, max_tokens=12) for seed in range(8)}
    assert len(set(alone.values())) > 1  # seeds matter

    def one(seed: int) -> tuple[str, str]:
        with openai_client(served[0]) as own:
            return answer(own, seed=seed, max_tokens=12)

    with ThreadPoolExecutor(8) as pool:  # 8 at once through 4 slots
        together = dict(zip(range(8), pool.map(one, range(8)), strict=True))
    assert together == alone
    # choice c of seed s is choice 0 of seed s + c
    two = ask(client, seed=3, n=2, max_tokens=12).choices
    assert [c.index for c in two] == [0, 1]
    assert [(c.message.content, c.finish_reason) for c in two] == [alone[3], alone[4]]


def test_a_stream_comes_in_openais_order(client, http):
    whole = ask(client, seed=5, max_tokens=LIMIT, temperature=1.0)
    chunks = list(ask(client, seed=5, max_tokens=LIMIT, temperature=1.0, stream=True,
                      stream_options={"include_usage": True}))
    first, *pieces, finish, last = chunks
    assert all(c.object == "chat.completion.chunk" and c.id == first.id and c.id.startswith("chatcmpl-")
               for c in chunks)
    assert (first.choices[0].delta.role, first.choices[0].delta.content, first.choices[0].finish_reason) == (
        "assistant", "", None)
    assert pieces and all(p.choices[0].delta.content and p.choices[0].finish_reason is None for p in pieces)
    assert "".join(p.choices[0].delta.content for p in pieces) == whole.choices[0].message.content
    assert finish.choices[0].delta.content is None and finish.choices[0].delta.role is None
    assert finish.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.choices == [] and last.usage == whole.usage
    # on the wire: the role, the text, an empty delta with the reason, the usage, [DONE]; "usage": null before
    payloads = events(http, seed=5, max_tokens=LIMIT, stream_options={"include_usage": True})
    assert payloads[-1] == "[DONE]"
    assert payloads[0]["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]
    assert payloads[-3]["choices"] == [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": whole.choices[0].finish_reason}]
    counts = {name: getattr(whole.usage, name)
              for name in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert all(p["usage"] is None for p in payloads[:-2]) and payloads[-2]["usage"] == counts
    assert "usage" not in events(http, seed=5, max_tokens=3)[0]  # only when asked for
    assert [p["choices"][0]["finish_reason"] for p in events(http, max_tokens=3)[:-1]][-1] == "length"


def test_n_streams_each_choice_in_order(client):
    whole = [c.message.content for c in ask(client, seed=9, n=3, max_tokens=12).choices]
    texts, roles, finishes = ["", "", ""], [], []
    for chunk in ask(client, seed=9, n=3, max_tokens=12, stream=True):
        [choice] = chunk.choices
        if choice.delta.role:
            assert not texts[choice.index] and choice.index not in finishes  # the role comes first
            roles.append(choice.index)
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes.append(choice.index)
    assert sorted(roles) == sorted(finishes) == [0, 1, 2]
    assert texts == whole


def test_stop_strings_cut_the_answer_before_them(client, http):
    text, _ = answer(client, temperature=0)
    stop = text[3:5]
    cut = text[: text.index(stop)]
    assert answer(client, temperature=0, stop=stop) == (cut, "stop")
    assert answer(client, temperature=0, stop=["never", stop]) == (cut, "stop")
    streamed = ask(client, temperature=0, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut


def test_developer_is_system_and_text_parts_are_joined(client):
    system = [{"role": "system", "content": "Be brief."}, *SO_LONG]
    developer = [{"role": "developer", "content": "Be brief."}, *SO_LONG]
    assert ask(client, developer, temperature=0).model_dump(exclude={"id", "created"}) == ask(
        client, system, temperature=0).model_dump(exclude={"id", "created"})
    parts = [{"role": "user", "content": [{"type": "text", "text": "So"}, {"type": "text", "text": "long"}]}]
    joined = [{"role": "user", "content": "So\nlong"}]
    assert answer(client, messages=parts, temperature=0) == answer(client, messages=joined, temperature=0)


def test_the_openai_client_raises_bad_request_for_what_this_server_does_not_do(client):
    cases = [
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
         "messages[0].content[0].type"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}},
         "response_format"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 1}, "top_logprobs"),  # without logprobs: true
        ({"messages": [{"role": "user", "content": "So long " * 5}]}, "max_tokens"),  # over the context
        ({"n": 5}, "n"),
        ({"max_completion_tokens": LIMIT + 1}, "max_completion_tokens"),
    ]
    for options, param in cases:
        with pytest.raises(openai.BadRequestError) as error:
            ask(client, **{"messages": SO_LONG, **options})
        assert error.value.status_code == 400 and error.value.param == param, error.value
    with pytest.raises(openai.BadRequestError, match="maximum context length is 32 tokens"):
        ask(client, [{"role": "user", "content": "So long " * 5}], stream=True)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=SO_LONG)
    with pytest.raises(openai.UnprocessableEntityError):
        ask(client, temperature=3)
    # neutral values of those fields are fine: clients send them
    assert ask(client, tools=[], tool_choice="none", response_format={"type": "text"}, logprobs=False,
               top_logprobs=0, presence_penalty=0, frequency_penalty=0, logit_bias={}, user="me",
               metadata={"a": "b"}, max_tokens=2).choices


@pytest.mark.parametrize(("body", "status", "param", "message"), [
    ({"messages": []}, 400, "messages", "messages is empty"),
    ({"messages": [{"role": "narrator", "content": "So"}]}, 400, "messages[0].role",
     "'narrator' is not supported"),
    ({"messages": [{"role": "assistant", "content": None}]}, 400, "messages[0].content",
     "content is missing"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400, "messages[0].content[0].text",
     "needs its text"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, 400, "messages[0].content", "cannot be tokenized"),
    ({"messages": [{"role": "assistant", "content": "", "tool_calls": []}]}, 400, "messages[0].tool_calls",
     "not supported"),
    ({"max_tokens": 3, "max_completion_tokens": 4}, 400, "max_completion_tokens", "differ"),
    ({"max_tokens": LIMIT + 1}, 400, "max_tokens", f"above this server's limit of {LIMIT}"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4 stop strings"),
    ({"messages": "So long"}, 422, "messages", "messages: Input should be a valid array"),
    ({"messages": [{"content": "So"}]}, 422, "messages", "messages[0].role: Field required"),
    ({"messages": [{"role": "user", "content": 5}]}, 422, "messages", "messages[0].content: Input should be"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 422, "messages",
     "messages[0].content[0].text: Input should be a valid string"),
    ({"messages": [{"role": "user", "content": "So", "mood": "x"}]}, 422, "messages",
     "messages[0].mood: Extra inputs are not permitted"),
    ({"max_completion_tokens": 2.0}, 422, "max_completion_tokens", "valid integer"),
    ({"temperature": "0.5"}, 422, "temperature", "valid number"),
    ({"stream": "yes"}, 422, "stream", "valid boolean"),
    ({"n": 0}, 422, "n", "greater than or equal to 1"),
    ({"best_of": 2}, 422, "best_of", "Extra inputs are not permitted"),
])
def test_bad_chat_requests_get_openai_errors(http, body, status, param, message):
    error = error_of(http.post("/v1/chat/completions", json={"messages": SO_LONG, **body}), status)
    assert (error["param"], error["type"]) == (param, "invalid_request_error") and message in error["message"]


def test_nulls_are_defaults_and_completions_share_the_engine(http):
    nulls = dict.fromkeys(("max_tokens", "temperature", "top_p", "n", "stop", "seed", "stream", "logprobs"))
    assert chat(http, **nulls, max_completion_tokens=4)["usage"]["completion_tokens"] == 4
    completion = http.post("/v1/completions", json={"prompt": "So long", "max_tokens": 4})
    assert completion.status_code == 200 and completion.json()["usage"]["completion_tokens"] == 4


def test_a_base_model_has_no_chat(runs):
    with server(runs[0], model_id="tiny-base") as (url, _), openai_client(url) as client:
        with pytest.raises(openai.BadRequestError) as error:
            client.chat.completions.create(model="tiny-base", messages=SO_LONG)
        assert NO_TEMPLATE in error.value.message and error.value.code == "no_chat_template"
        assert httpx.get(f"{url}/health").json()["chat"] is False
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["chat"] is False
        assert client.completions.create(model="tiny-base", prompt="So", max_tokens=3).choices[0].text


def test_a_client_that_leaves_a_stream_frees_its_slots(served):
    url, app = served
    with slow_steps(app, 0.05), httpx.Client(base_url=url, timeout=60) as own, own.stream(
        "POST", "/v1/chat/completions", json={"messages": SO_LONG, "n": 2, "stream": True}
    ) as r:
        lines = r.iter_lines()  # held: dropping it would close the connection
        next(lines)
        health_within(own, lambda health: health["busy"] == 2, 5)
        r.close()
        health_within(own, lambda health: health["busy"] == 0, 1)


def test_every_field_with_every_odd_value(served, client):
    """Every field of the request, of a message and of a content part, given values of every JSON type: each
    answer a 2xx or an OpenAI-shaped 4xx on a connection that stays open, and the server the same after."""
    before = answer(client, temperature=0)
    valid = {"messages": SO_LONG, "max_tokens": 2}
    bodies = [{**valid, field: value} for field in ChatCompletionRequest.model_fields for value in ODD]
    bodies += [{**valid, "messages": [{"role": "user", "content": "So", field: value}]}
               for field in ChatMessage.model_fields for value in ODD]
    bodies += [{**valid, "messages": [{"role": "user", "content": [{"type": "text", "text": "So", key: v}]}]}
               for key in ContentPart.model_fields for v in ODD]
    json_type = {"content-type": "application/json"}
    requests = [("POST", "/v1/chat/completions", json.dumps(body).encode(), json_type) for body in bodies]
    with httpx.Client(base_url=served[0], timeout=30) as http:
        check_all(http, requests)
    assert answer(client, temperature=0) == before
    assert httpx.get(f"{served[0]}/health").json()["busy"] == 0
