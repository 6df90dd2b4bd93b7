"""Tests for `gptforge serve` as OpenAI's clients and the evaluation tools use it (gptforge.serve's
completions, chat and logprobs), against real uvicorn servers on 127.0.0.1, driven by the unmodified `openai`
package and by lm-evaluation-harness.

- A tiny random GPT-2 (test_serve.tiny_hf_dir, GPT-2's tokenizer): logprobs, echo, max_tokens=0, token
  prompts, presence and frequency penalties, logit_bias, best_of, suffix's refusal, models.retrieve and the
  fields every completion has. Logprobs equal gptforge's own `evaluate.Scorer` log-likelihoods of the same
  tokens within 1e-4, token strings are checked against tiktoken's own bytes of each token.
- The tiny finetuned char run of test_serve_chat: a chat's logprobs in OpenAI's chat shape, against the
  Scorer too; and its base, exported with `gptforge export --format=hf`, evaluated by lm-evaluation-harness's
  `local-completions` on the multiple-choice task of tests/fixtures/lm_eval: the accuracy it reports is the
  one the Scorer gives, its loglikelihoods the Scorer's, and its greedy generations the server's.

    .venv/bin/python -m pytest tests/test_serve_openai.py
"""

import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
import yaml
from mirror_data import needs_mirror, reference_gpt2
from test_serve import server, tiny_hf_dir
from test_serve_chat import LIMIT, SO_LONG, finetuned_run
from test_serve_chat import server as chat_server
from test_serve_engine import steered_decode

from gptforge.cli import main
from gptforge.evaluate import Request, Scorer
from gptforge.serve.api import MAX_LOGPROBS, MAX_TOP_LOGPROBS
from gptforge.source import load_source

pytestmark = needs_mirror

FIXTURES = Path(__file__).parent / "fixtures" / "lm_eval"
PROMPT = "The meaning of life is"
MODEL = "tiny-gpt2"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_hf_dir(tmp_path_factory.mktemp("openai") / MODEL)


@pytest.fixture(scope="module")
def served(model_dir) -> Iterator[tuple[str, Any]]:
    with server(model_dir) as running:
        yield running


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def client(served) -> Iterator[openai.OpenAI]:
    with openai_client(served[0]) as client:
        yield client


@pytest.fixture(scope="module")
def source(model_dir) -> Any:
    return load_source(str(model_dir))


@pytest.fixture(scope="module")
def scorer(source) -> Scorer:
    return Scorer(source.model.eval(), progress=False)


def complete(client: openai.OpenAI, **options: Any) -> Any:
    return client.completions.create(model=MODEL, **{"prompt": PROMPT, **options})


def scores(scorer: Scorer, context: list[int], continuation: list[int]) -> list[float]:
    """The Scorer's log-likelihood of each continuation token, given the context and the tokens before it."""
    [[scored]] = scorer.score([[Request(context + continuation, len(context))]])
    return scored.logprobs.tolist()


@functools.cache
def gpt2_ids() -> dict[bytes, int]:
    """tiktoken's own bytes of every GPT-2 token, to its id: the reference for token strings."""
    encoding = reference_gpt2()
    return {encoding.decode_single_token_bytes(i): i for i in range(encoding.n_vocab)}


def token_bytes(token: str) -> bytes:
    """The bytes a token string of the logprobs stands for: its text, or `bytes:\\xNN...`."""
    if token.startswith("bytes:"):
        return bytes.fromhex(token.removeprefix("bytes:").replace("\\x", ""))
    return token.encode()


def ids_of(tokens: list[str]) -> list[int]:
    return [gpt2_ids()[token_bytes(token)] for token in tokens]


def expected_offsets(start: int, pieces: list[bytes]) -> list[int]:
    """Where each token starts in a text: the index of the character its first byte is part of."""
    text, offsets = b"", []
    for piece in pieces:
        offsets.append(start + len(text.decode("utf-8", errors="ignore")))
        text += piece
    return offsets


def top_reference(source: Any, ids: list[int], k: int) -> list[dict[int, float]]:
    """The k likeliest next tokens after each prefix of `ids`, from a full forward."""
    with torch.inference_mode():
        logits, _ = source.model(torch.tensor([ids]), targets=torch.tensor([ids]))
    values, tokens = torch.log_softmax(logits[0].float(), dim=-1).topk(k)
    return [dict(zip(t.tolist(), v.tolist(), strict=True)) for t, v in zip(tokens, values, strict=True)]


@pytest.mark.parametrize("sampling", [
    {"temperature": 0}, {"seed": 3, "temperature": 0.9, "extra_body": {"top_k": 50}},  # top_k: an extension
])
def test_a_completions_logprobs_are_the_scorers(client, source, scorer, sampling):
    prompt = source.tokenizer.encode(PROMPT)
    result = complete(client, max_tokens=16, logprobs=MAX_LOGPROBS, **sampling)
    [choice] = result.choices
    logprobs = choice.logprobs
    n = result.usage.completion_tokens
    assert n == 16 and choice.finish_reason == "length"
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == n
    ids = ids_of(logprobs.tokens)
    assert source.tokenizer.decode(ids) == choice.text
    assert logprobs.token_logprobs == pytest.approx(scores(scorer, prompt, ids), abs=1e-4)
    assert "\ufffd" not in choice.text  # valid UTF-8 throughout: expected_offsets's rule holds
    assert logprobs.text_offset == expected_offsets(0, [token_bytes(t) for t in logprobs.tokens])
    # the alternatives: the model's likeliest, likeliest first, before temperature and top-k
    references = top_reference(source, prompt + ids, MAX_LOGPROBS)[len(prompt) - 1:-1]
    for top, expected in zip(logprobs.top_logprobs, references, strict=True):
        assert len(top) == MAX_LOGPROBS and list(top.values()) == sorted(top.values(), reverse=True)
        assert ids_of(list(top)) == list(expected)
        assert list(top.values()) == pytest.approx(list(expected.values()), abs=1e-4)
    for token, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True):
        assert token <= max(top.values())
        if sampling.get("temperature") == 0:  # exactly: lm-evaluation-harness's is_greedy test
            assert token == max(top.values())


def test_echo_with_max_tokens_0_scores_token_prompts_as_lm_eval_asks(client, source, scorer):
    """lm-evaluation-harness's request: token-id prompts in a batch, echo, logprobs, no new token (or
    one)."""
    tokenizer = source.tokenizer
    prompts = [tokenizer.encode(PROMPT), tokenizer.encode("Once upon a time, in a land far away")]
    result = complete(client, prompt=prompts, max_tokens=0, echo=True, logprobs=1, temperature=0)
    assert [c.index for c in result.choices] == [0, 1]
    for choice, ids in zip(result.choices, prompts, strict=True):
        assert (choice.text, choice.finish_reason) == (tokenizer.decode(ids), "length")
        logprobs = choice.logprobs
        assert ids_of(logprobs.tokens) == ids
        assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
        assert logprobs.token_logprobs[1:] == pytest.approx(scores(scorer, ids[:1], ids[1:]), abs=1e-4)
        assert all(len(top) == 1 for top in logprobs.top_logprobs[1:])
        assert logprobs.text_offset == expected_offsets(0, [token_bytes(t) for t in logprobs.tokens])
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (sum(map(len, prompts)), 0)
    # echo and one new token: the prompt's scores, then the completion's, its offsets after the prompt's text
    one = complete(client, prompt=[prompts[0]], max_tokens=1, echo=True, logprobs=1, temperature=0)
    alone = complete(client, prompt=prompts[0], max_tokens=1, logprobs=1, temperature=0)
    [choice], [plain] = one.choices, alone.choices
    assert choice.text == PROMPT + plain.text
    assert choice.logprobs.tokens == result.choices[0].logprobs.tokens + plain.logprobs.tokens
    assert choice.logprobs.token_logprobs == result.choices[0].logprobs.token_logprobs + (
        plain.logprobs.token_logprobs)
    assert choice.logprobs.text_offset[-1] == len(PROMPT) and plain.logprobs.text_offset == [0]
    # echo without logprobs: the text only
    echoed = complete(client, max_tokens=5, echo=True, seed=1).choices[0]
    assert echoed.text == PROMPT + complete(client, max_tokens=5, seed=1).choices[0].text
    assert echoed.logprobs is None


def test_token_prompts_are_the_prompts_texts(client, source):
    ids = source.tokenizer.encode(PROMPT)
    texts = [c.text for c in complete(client, prompt=[PROMPT, "Once"], n=2, seed=4, max_tokens=8).choices]
    assert [c.text for c in complete(client, prompt=[ids, source.tokenizer.encode("Once")], n=2, seed=4,
                                     max_tokens=8).choices] == texts
    assert complete(client, prompt=ids, seed=4, max_tokens=8).choices[0].text == texts[0]
    for prompt, where in [([50257], "prompt"), ([[1], [2, -5]], "prompt[1]"), ([[1], []], "prompt[1]")]:
        with pytest.raises(openai.BadRequestError) as error:
            complete(client, prompt=prompt)
        assert error.value.param == "prompt" and where in error.value.message


def test_tokens_that_are_no_text_alone_are_shown_as_bytes(client):
    """GPT-2 cuts an emoji into byte pieces: each is `bytes:\\xNN` as OpenAI shows it, starts at the
    character it is part of, and together they are the text."""
    prompt = "I \u2764 \U0001f600!"
    logprobs = complete(client, prompt=prompt, max_tokens=0, echo=True, logprobs=0).choices[0].logprobs
    pieces = [token_bytes(t) for t in logprobs.tokens]
    assert b"".join(pieces).decode() == prompt and any(t.startswith("bytes:\\x") for t in logprobs.tokens)
    for token, piece in zip(logprobs.tokens, pieces, strict=True):
        assert piece in gpt2_ids()
        try:
            assert token == piece.decode()
        except UnicodeDecodeError:
            assert token == "bytes:" + "".join(f"\\x{b:02x}" for b in piece)
    assert logprobs.text_offset == expected_offsets(0, pieces)
    assert logprobs.top_logprobs[1:] == [{}] * (len(pieces) - 1)  # logprobs=0: the tokens' own only


def test_presence_and_frequency_penalties_and_logit_bias_are_openais(client, source):
    prompt = source.tokenizer.encode(PROMPT)
    plain = complete(client, max_tokens=12, temperature=0).choices[0].text
    for bias, presence, frequency in [({}, 1.0, 0.0), ({}, 0.0, 1.5), ({262: 5.0, 13: -3.0}, 0.5, 0.5)]:
        expected = steered_decode(source.model, prompt, 12, bias, presence, frequency)
        steered = complete(client, max_tokens=12, temperature=0, presence_penalty=presence,
                           frequency_penalty=frequency, logit_bias={str(t): b for t, b in bias.items()})
        text = steered.choices[0].text
        assert text == source.tokenizer.decode(expected) and text != plain
    greedy = complete(client, max_tokens=6, temperature=0, logprobs=0).choices[0]
    first = ids_of(greedy.logprobs.tokens)[0]
    banned = complete(client, max_tokens=6, temperature=0, logprobs=0, logit_bias={str(first): -100})
    assert first not in ids_of(banned.choices[0].logprobs.tokens)
    forced = complete(client, max_tokens=6, seed=2, logit_bias={"318": 100}).choices[0]
    assert forced.text == source.tokenizer.decode([318] * 6)
    # end-of-text made certain: the sample stops at once; its token is in the logprobs, not in the text
    ended = complete(client, max_tokens=6, logprobs=0, logit_bias={"50256": 100})
    [choice] = ended.choices
    assert (choice.text, choice.finish_reason, ended.usage.completion_tokens) == ("", "stop", 1)
    assert (choice.logprobs.tokens, choice.logprobs.text_offset) == (["<|endoftext|>"], [0])
    for options, message in [({"logit_bias": {"cat": 1}}, "no token id"),
                             ({"logit_bias": {"50257": 1}}, "no token id"),
                             ({"logit_bias": {"1": 100.5}}, "between -100 and 100")]:
        with pytest.raises(openai.BadRequestError, match=message) as error:
            complete(client, **options)
        assert error.value.param == "logit_bias"
    with pytest.raises(openai.UnprocessableEntityError):
        complete(client, presence_penalty=2.5)


def test_best_of_picks_the_highest_summed_logprob(client):
    seeds = [complete(client, max_tokens=8, seed=10 + j, logprobs=0) for j in range(3)]
    sums = [sum(r.choices[0].logprobs.token_logprobs) for r in seeds]
    texts = [r.choices[0].text for r in seeds]
    ranked = sorted(range(3), key=lambda j: -sums[j])
    one = complete(client, max_tokens=8, seed=10, best_of=3)
    assert [c.text for c in one.choices] == [texts[ranked[0]]] and one.choices[0].logprobs is None
    two = complete(client, max_tokens=8, seed=10, best_of=3, n=2, logprobs=0)
    assert [c.text for c in two.choices] == [texts[j] for j in ranked[:2]]
    assert [c.index for c in two.choices] == [0, 1]
    assert [sum(c.logprobs.token_logprobs) for c in two.choices] == [sums[j] for j in ranked[:2]]
    assert two.usage.completion_tokens == sum(r.usage.completion_tokens for r in seeds)  # every candidate's
    for options, message in [({"best_of": 2, "n": 3}, "at least n"), ({"best_of": 5}, "between 1 and 4"),
                             ({"best_of": 2, "stream": True}, "cannot stream")]:
        with pytest.raises(openai.BadRequestError, match=message) as error:
            complete(client, **options)
        assert error.value.param == "best_of"


def test_what_is_refused_is_refused_by_name(client):
    for options, param in [({"suffix": " the end."}, "suffix"), ({"logprobs": MAX_LOGPROBS + 1}, "logprobs"),
                           ({"max_tokens": 101}, "max_tokens")]:
        with pytest.raises(openai.BadRequestError) as error:
            complete(client, **options)
        assert error.value.status_code == 400 and error.value.param == param
    assert complete(client, suffix="", max_tokens=1).choices  # the neutral value is fine


def test_models_retrieve(client):
    model = client.models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "gptforge")
    assert model.model_dump() == client.models.list().data[0].model_dump()
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-4")
    assert error.value.code == "model_not_found" and error.value.body["type"] == "invalid_request_error"
    assert error.value.param == "model" and "`gpt-4` does not exist" in error.value.message


def test_every_completion_has_openais_fields(client):
    results = [complete(client, max_tokens=3), complete(client, max_tokens=0, echo=True),
               complete(client, max_tokens=3, stream=False, n=2, best_of=3)]
    for result in results:
        assert result.id.startswith("cmpl-") and result.object == "text_completion" and result.model == MODEL
        assert isinstance(result.created, int) and result.usage is not None
        assert result.system_fingerprint.startswith("fp_")
    assert len({r.system_fingerprint for r in results}) == 1 and len({r.id for r in results}) == 3
    greedy = complete(client, max_tokens=12, temperature=0).choices[0].text
    stopped = complete(client, max_tokens=12, temperature=0, stop=greedy[5:9]).choices[0]
    assert (stopped.text, stopped.finish_reason) == (greedy[:greedy.index(greedy[5:9])], "stop")
    chunks = list(complete(client, max_tokens=4, stream=True))
    assert {c.system_fingerprint for c in chunks} == {results[0].system_fingerprint}
    assert chunks[-1].choices[0].finish_reason == "length"


def test_a_stream_carries_the_logprobs_of_the_whole(client):
    whole = complete(client, max_tokens=20, seed=8, echo=True, logprobs=3).choices[0]
    text, parts = "", {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in complete(client, max_tokens=20, seed=8, echo=True, logprobs=3, stream=True):
        [choice] = chunk.choices
        text += choice.text
        for key, values in parts.items():
            values += getattr(choice.logprobs, key)
    assert text == whole.text
    assert parts == {key: getattr(whole.logprobs, key) for key in parts}


# -- chat, and lm-evaluation-harness: the tiny char runs of test_serve_chat --


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    return finetuned_run(tmp_path_factory.mktemp("openai-chat"))


def test_a_chats_logprobs_are_openais_and_the_scorers(runs):
    source = load_source(str(runs[1]))
    template, tokenizer = source.chat_template, source.tokenizer
    prompt, _ = template.render(tokenizer, SO_LONG, add_generation_prompt=True)
    scorer = Scorer(source.model.eval(), progress=False)
    with chat_server(runs[1]) as (url, _), openai_client(url) as client:
        def ask(**options: Any) -> Any:
            return client.chat.completions.create(model="tiny-chat", messages=SO_LONG, **options)

        result = ask(logprobs=True, top_logprobs=3, temperature=0, max_tokens=LIMIT)
        [choice] = result.choices
        content = choice.logprobs.content
        # the answer's tokens, its end marker left out as it is from the text
        assert choice.finish_reason == "stop" and len(content) == result.usage.completion_tokens - 1
        assert "".join(t.token for t in content) == choice.message.content
        assert all(bytes(t.bytes) == t.token.encode() for t in content)
        ids = [tokenizer.encode(t.token)[0] for t in content]
        assert [t.logprob for t in content] == pytest.approx(scores(scorer, prompt, ids), abs=1e-4)
        for token in content:
            assert len(token.top_logprobs) == 3 and token.top_logprobs[0].logprob == token.logprob  # greedy
            assert [t.logprob for t in token.top_logprobs] == sorted((t.logprob for t in token.top_logprobs),
                                                                    reverse=True)
            assert all(bytes(t.bytes) == t.token.encode() for t in token.top_logprobs)
        # seeded and streamed: the pieces' logprobs are the whole's
        whole = ask(logprobs=True, seed=4, max_tokens=LIMIT).choices[0]
        assert all(t.top_logprobs == [] for t in whole.logprobs.content)
        streamed = [t for chunk in ask(logprobs=True, seed=4, max_tokens=LIMIT, stream=True)
                    for c in chunk.choices if c.logprobs for t in c.logprobs.content]
        assert streamed == whole.logprobs.content
        assert ask(seed=4, max_tokens=LIMIT).choices[0].logprobs is None
        for options, param in [({"logprobs": True, "top_logprobs": MAX_TOP_LOGPROBS + 1}, "top_logprobs"),
                               ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
                               ({"logit_bias": {"999": 1}}, "logit_bias")]:
            with pytest.raises(openai.BadRequestError) as error:
                ask(**options)
            assert error.value.param == param
        # logit_bias and the penalties steer a chat too
        first = tokenizer.encode(content[0].token)[0]
        banned = ask(temperature=0, max_tokens=4, logit_bias={str(first): -100}).choices[0].message.content
        assert not banned.startswith(content[0].token)
        assert ask(temperature=0, max_tokens=4, presence_penalty=2, frequency_penalty=2).choices


def lm_eval_task(name: str, directory: Path) -> Path:
    """The fixture's task YAML in `directory`, its data file's path made absolute."""
    config = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text(encoding="utf-8"))
    config["dataset_kwargs"]["data_files"]["test"] = str(FIXTURES / "sonnet.jsonl")
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return directory


def test_lm_evaluation_harness_scores_as_gptforge_does(runs, tmp_path, monkeypatch):
    """lm-eval's local-completions model on the fixture's multiple-choice task, against the served base run
    and the tokenizer of its HF export: the loglikelihoods it gets are the Scorer's, so its accuracy is the
    accuracy gptforge computes; its greedy generations are the server's."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    base = runs[0]
    export = tmp_path / "hf"
    assert main(["export", f"--out_dir={base}", "--format=hf", f"--to={export}"]) == 0
    source = load_source(str(base))
    block_size = source.model.config.block_size
    tasks = lm_eval_task("gptforge_sonnet", tmp_path / "tasks")
    lm_eval_task("gptforge_sonnet_gen", tasks)
    with chat_server(base, model_id="tiny-base") as (url, _):
        model_args = (f"model=tiny-base,base_url={url}/v1/completions,tokenizer_backend=huggingface,"
                      f"tokenizer={export},max_length={block_size}")
        out = lm_eval.simple_evaluate(
            model="local-completions", model_args=model_args,
            tasks=["gptforge_sonnet", "gptforge_sonnet_gen"],
            task_manager=TaskManager(include_path=str(tasks), include_defaults=False))
        with openai_client(url) as client:
            greedy = [client.completions.create(model="tiny-base", prompt=sample["doc"]["context"],
                                                max_tokens=8, temperature=0, stop=["\n"]).choices[0].text
                      for sample in out["samples"]["gptforge_sonnet_gen"]]
    # gptforge's own scores of the same contexts and continuations
    scorer = Scorer(source.model.eval(), progress=False)
    samples = out["samples"]["gptforge_sonnet"]
    assert len(samples) == len((FIXTURES / "sonnet.jsonl").read_text().splitlines())
    correct = correct_norm = 0
    for sample in samples:
        doc = sample["doc"]
        context = source.tokenizer.encode(doc["context"])
        expected = [sum(scores(scorer, context, source.tokenizer.encode(" " + c))) for c in doc["choices"]]
        got = [loglikelihood for loglikelihood, _ in sample["filtered_resps"]]
        assert got == pytest.approx(expected, abs=1e-4)
        correct += int(np.argmax(expected)) == doc["label"]
        correct_norm += int(np.argmax(np.array(expected) / [len(c) for c in doc["choices"]])) == doc["label"]
    results = out["results"]["gptforge_sonnet"]
    assert results["acc,none"] == pytest.approx(correct / len(samples))
    assert results["acc_norm,none"] == pytest.approx(correct_norm / len(samples))
    assert [sample["filtered_resps"][0] for sample in out["samples"]["gptforge_sonnet_gen"]] == greedy
    assert not math.isnan(out["results"]["gptforge_sonnet_gen"]["exact_match,none"])
