"""Tests for continuous batching (gptforge.serve.engine) and the SlotKVCache: per-slot positions give the
logits of a full forward, a row's logits do not depend on the other rows, every step size rounds a row as a
step of all the slots, seeded samples (their tokens and their logprobs) are the same alone or among 1 to 15
others, through the engine and the HTTP API, logprobs and a prompt's scores against a full forward,
logit_bias and OpenAI's penalties against a direct decode, stop strings, end-of-text and a job's own stop
tokens, cancellation, the queue bound and failures.

    .venv/bin/python -m pytest tests/test_serve_engine.py
"""

import string
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import tiny_config
from torch.nn import functional as F

from gptforge.kv_cache import SlotKVCache
from gptforge.model import GPT
from gptforge.serve.app import create_app
from gptforge.serve.engine import (
    Delta,
    Engine,
    EngineStopped,
    InvalidJob,
    Job,
    QueueFull,
    Sampling,
    StopStrings,
    TokenLogprob,
    draw,
)
from gptforge.serve.server import ServeOptions, serve_in_thread
from gptforge.tokenizer import CharTokenizer

CHARS = string.printable[:95] + "éü"  # 97 characters: tiny_config's vocab_size


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(1234)
    return GPT(tiny_config()).eval()


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer(CHARS)


@pytest.fixture
def engine(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=6, max_queue=8)
    engine.start()
    yield engine
    engine.stop()


class Collector:
    """A job's pieces as they arrive, and an event once every sample has ended (or the job failed)."""

    def __init__(self, n: int):
        self.pieces: list[Delta] = []
        self.open, self.done = n, threading.Event()

    def __call__(self, piece: Delta) -> None:
        self.pieces.append(piece)
        self.open -= piece.finish_reason is not None
        if self.open == 0 or piece.error is not None:
            self.done.set()

    def samples(self) -> list[tuple[str, str | None, int]]:
        """(text, finish_reason, tokens) of each sample, in index order."""
        indices = sorted({p.index for p in self.pieces})
        return [("".join(p.text for p in self.pieces if p.index == i),
                 next(p.finish_reason for p in self.pieces if p.index == i and p.finish_reason),
                 next(p.tokens for p in self.pieces if p.index == i and p.finish_reason)) for i in indices]


    def logprobs(self, index: int = 0) -> list[TokenLogprob]:
        """The logprobs of sample `index`'s drawn tokens, in order."""
        return [entry for p in self.pieces if p.index == index for entry in p.logprobs]


def submit(engine: Engine, tokenizer, prompt: str, n: int = 1, **sampling) -> tuple[Job, Collector]:
    collector = Collector(n)
    job = Job(tokenizer.encode(prompt), n, Sampling(**{"max_tokens": 20, **sampling}), collector)
    engine.submit([job])
    return job, collector


def run(engine: Engine, tokenizer, prompt: str, n: int = 1, **sampling) -> list[tuple[str, str | None, int]]:
    _, collector = submit(engine, tokenizer, prompt, n, **sampling)
    assert collector.done.wait(30)
    return collector.samples()


# -- the model's SlotKVCache --


def prefill(model: GPT, cache: SlotKVCache, slot: int, ids: torch.Tensor) -> None:
    model(ids[None], kv_cache=cache.slot(slot))
    cache.occupy(slot, len(ids))


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
@pytest.mark.parametrize("every_slot", [True, False])
def test_slot_cache_steps_give_the_logits_of_a_full_forward(pos_emb, every_slot):
    torch.manual_seed(0)
    model = GPT(tiny_config(pos_emb=pos_emb)).eval()
    cache = SlotKVCache(model.config, 4, torch.float32)
    seqs = {0: torch.randint(0, 97, (9,)), 2: torch.randint(0, 97, (3,)), 3: torch.randint(0, 97, (20,))}
    with torch.inference_mode():
        for slot, ids in seqs.items():
            prefill(model, cache, slot, ids)
        for _ in range(5):  # slot 1 stays free throughout
            cache.rows = [0, 1, 2, 3] if every_slot else sorted(seqs)
            new = {slot: torch.randint(0, 97, (1,)) for slot in seqs}
            idx = torch.stack([new.get(slot, torch.zeros(1, dtype=torch.long)) for slot in cache.rows])
            logits, _ = model(idx, kv_cache=cache)
            for row, slot in enumerate(cache.rows):
                if slot in seqs:
                    seqs[slot] = torch.cat([seqs[slot], new[slot]])
                    full, _ = model(seqs[slot][None])
                    torch.testing.assert_close(logits[row, -1], full[0, -1], rtol=0, atol=1e-5)
    assert cache.lengths == [14, 0, 8, 25] and cache.busy == [True, False, True, True]
    with pytest.raises(ValueError, match="one token per slot"):
        model(torch.zeros(len(cache.rows), 2, dtype=torch.long), kv_cache=cache)


def test_a_rows_logits_do_not_depend_on_the_other_rows(model):
    """Bit for bit: the same sequence alone in slot 0, or in slot 5 among busy slots of other lengths."""
    torch.manual_seed(1)
    ids, token = torch.randint(0, 97, (12,)), torch.tensor([7])

    def step(slot: int, others: dict[int, int]) -> torch.Tensor:
        cache = SlotKVCache(model.config, 8, torch.float32)
        prefill(model, cache, slot, ids)
        for other, length in others.items():
            prefill(model, cache, other, torch.randint(0, 97, (length,)))
        idx = torch.randint(0, 97, (8, 1))
        idx[slot] = token
        return model(idx, kv_cache=cache)[0][slot, -1]

    with torch.inference_mode():
        alone = step(0, {})
        crowded = step(5, {0: 3, 1: 40, 2: 1, 3: 17, 4: 12, 6: 60, 7: 5})
        assert torch.equal(alone, crowded)
        cache = SlotKVCache(model.config, 1, torch.float32)  # not what the server does: another batch shape
        prefill(model, cache, 0, ids)
        torch.testing.assert_close(model(token[None], kv_cache=cache)[0][0, -1], alone, rtol=0, atol=1e-5)


def test_slot_copy_shares_a_prefill(model):
    cache = SlotKVCache(model.config, 3, torch.float32)
    with torch.inference_mode():
        prefill(model, cache, 0, torch.randint(0, 97, (10,)))
        cache.copy(0, 2)
        logits, _ = model(torch.tensor([[5], [0], [5]]), kv_cache=cache)
    assert torch.equal(logits[0], logits[2]) and cache.lengths == [11, 0, 11]


# -- sampling and stop strings --


def test_draw_samples_the_filtered_distribution():
    logits = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log().expand(10000, -1)  # 10000 rows: 10000 draws
    generator = torch.Generator().manual_seed(0)
    for sampling, expected in [
        (Sampling(1), [0.5, 0.3, 0.2, 0]),
        (Sampling(1, temperature=0.5), [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38, 0]),  # p^2, renormalised
        (Sampling(1, top_k=2), [0.625, 0.375, 0, 0]),
        (Sampling(1, top_p=0.6), [0.625, 0.375, 0, 0]),
    ]:
        tokens = torch.tensor(draw(logits, [(sampling, generator)] * len(logits)))
        frequencies = torch.bincount(tokens, minlength=4) / len(tokens)
        torch.testing.assert_close(frequencies, torch.tensor(expected), rtol=0, atol=0.02)
    assert draw(logits[:2], [(Sampling(1, temperature=0), generator), None]) == [0, None]


def test_a_rows_draw_does_not_depend_on_the_other_rows():
    torch.manual_seed(0)
    logits = torch.randn(4, 50257) * 3
    ours = (Sampling(1, temperature=0.9), torch.Generator().manual_seed(5))
    alone = draw(logits, [None, ours, None, None])[1]
    for _ in range(3):
        ours[1].manual_seed(5)
        others = torch.randn(4, 50257) * 3
        others[1] = logits[1]
        crowd = [(Sampling(1, top_k=k), torch.Generator().manual_seed(k)) for k in (3, 7)]
        assert draw(others, [crowd[0], ours, crowd[1], None])[1] == alone


@pytest.mark.parametrize("vocab_size", [97, 50257])
def test_the_draws_kernels_compute_each_row_as_alone(vocab_size):
    """What a draw's and a logprob's independence of the other rows rests on: softmax, its float64 cumulative
    sums and log-softmax give a row bit for bit alone and among 2 to 16 rows, wherever it sits."""
    torch.manual_seed(0)
    row = torch.randn(1, vocab_size) * 3

    def kernels(logits: torch.Tensor) -> list[torch.Tensor]:
        return [F.softmax(logits, -1).cumsum(-1, dtype=torch.float64), F.log_softmax(logits, -1)]

    alone = kernels(row)
    for size in range(2, 17):
        logits = torch.randn(size, vocab_size) * 3
        at = size // 3
        logits[at] = row[0]
        assert all(torch.equal(b[at], a[0]) for a, b in zip(alone, kernels(logits), strict=True)), size


@pytest.mark.parametrize("sampling", [
    Sampling(1, temperature=1e-40),  # logits / temperature overflow to inf: their softmax would be NaN
    Sampling(1, temperature=5e-324),  # 0 in float32: logits / 0
    Sampling(1, temperature=1e-40, top_k=3, top_p=0.5),
    Sampling(1, top_p=1e-300),  # 0 in float32: no token's mass reaches it
    Sampling(1, temperature=2.0, top_p=5e-324, top_k=10),
])
def test_draws_that_underflow_are_greedy_and_leave_the_other_rows_alone(sampling):
    """Rows of any sign and scale (a row all negative divides to -inf everywhere): always the argmax, never an
    id outside the vocabulary, and the draws of a normal row beside them unchanged."""
    torch.manual_seed(0)
    logits = torch.cat([torch.randn(3, 50257) * 3, -torch.rand(1, 50257) - 1, torch.zeros(1, 50257)])
    logits[4, 17] = 1.0
    ours = (Sampling(1, temperature=0.9), torch.Generator().manual_seed(5))
    alone = draw(logits, [None, ours, None, None, None])[1]
    ours[1].manual_seed(5)
    rows = [(sampling, torch.Generator().manual_seed(i)) for i in range(len(logits))]
    drawn = draw(logits, [rows[0], ours, *rows[2:]])
    assert drawn[1] == alone
    assert [token for i, token in enumerate(drawn) if i != 1] == [
        token for i, token in enumerate(logits.argmax(dim=-1).tolist()) if i != 1]


def test_stop_strings_cut_at_the_first_and_hold_back_possible_starts():
    stops = StopStrings(("cd", "xyz"))
    assert stops.push("ab") == ("ab", False)
    assert stops.push("x") == ("", False)  # could be the start of "xyz"
    assert stops.push("yq") == ("xyq", False)  # it was not
    assert stops.push("c") == ("", False)
    assert stops.push("de") == ("", True)  # "cd" ends the text before it
    late = StopStrings(("abcd", "bc"))
    assert late.push("abc") == ("a", True)  # the first stop string to appear wins
    held = StopStrings(("END",))
    assert held.push("the EN") == ("the ", False) and held.flush() == "EN"
    assert StopStrings(("",)).push("text") == ("text", False)  # an empty stop string stops nothing


# -- the engine --


def test_a_seeded_sample_is_the_same_alone_or_among_others(engine, tokenizer):
    alone = run(engine, tokenizer, "To be, or not", seed=3, max_tokens=40)
    crowd = [submit(engine, tokenizer, prompt, n, seed=seed, max_tokens=m, temperature=t, top_k=k)
             for prompt, n, seed, m, t, k in [("Shall I", 2, 1, 30, 1.0, None), ("abc", 1, None, 50, 0.5, 5)]]
    while not any(c.pieces for _, c in crowd):  # join while the others are decoding
        time.sleep(0.001)
    again = run(engine, tokenizer, "To be, or not", seed=3, max_tokens=40)
    for _, collector in crowd:
        assert collector.done.wait(30)
    assert again == alone
    assert alone[0][1:] == ("length", 40) and len(alone[0][0]) == 40
    assert run(engine, tokenizer, "To be, or not", seed=4, max_tokens=40) != alone


def test_a_seeded_samples_logprobs_are_the_same_alone_or_among_others(engine, tokenizer):
    """Bit for bit, with its alternatives, and steered by logit_bias and penalties itself, beside jobs that
    are steered otherwise, report more or no logprobs, or only score their prompt."""
    mine = {"seed": 3, "max_tokens": 40, "logprobs": 3, "presence_penalty": 0.5, "frequency_penalty": 0.3,
            "logit_bias": ((5, 2.0), (40, -1.0))}
    _, alone = submit(engine, tokenizer, "To be, or not", **mine)
    assert alone.done.wait(30)
    crowd = [submit(engine, tokenizer, *job, **options)[1] for job, options in [
        (("Shall I", 2), {"seed": 1, "max_tokens": 30, "logit_bias": ((7, 5.0),)}),
        (("abc",), {"max_tokens": 50, "temperature": 0.5, "frequency_penalty": 1.0, "logprobs": 5}),
        (("a longer prompt to score",), {"max_tokens": 0, "logprobs": 2, "prompt_logprobs": True}),
    ]]
    while not crowd[0].pieces:  # join while the others are decoding
        time.sleep(0.001)
    _, again = submit(engine, tokenizer, "To be, or not", **mine)
    assert again.done.wait(30) and all(c.done.wait(30) for c in crowd)
    assert again.samples() == alone.samples() and again.logprobs() == alone.logprobs()
    assert len(alone.logprobs()) == 40 and all(len(e.top) == 3 for e in alone.logprobs())
    assert not crowd[0].logprobs() and len(crowd[1].logprobs()) == crowd[1].samples()[0][2]


def test_every_step_size_rounds_a_row_as_a_step_of_all_the_slots(model, tokenizer):
    """Bit for bit, for a sequence unlike the one measured at start, wherever the row sits and whatever the
    other rows hold; without batch_invariant a step has as many rows as busy slots."""
    engine = Engine(model, tokenizer, max_batch=16)
    assert 16 in engine.step_sizes and set(engine.step_sizes) <= {1, 2, 4, 8, 16}
    assert Engine(model, tokenizer, max_batch=16, batch_invariant=False).step_sizes == tuple(range(1, 17))
    torch.manual_seed(3)
    cache = SlotKVCache(model.config, 16, torch.float32)
    lengths = [21, *range(1, 46, 3)]  # slot 0's sequence is the one followed, the others are of other lengths
    with torch.inference_mode():
        for slot, length in enumerate(lengths):
            prefill(model, cache, slot, torch.randint(0, 97, (length,)))

        def step(size: int, row: int) -> torch.Tensor:
            """Slot 0's logits from a step of `size` rows in which it is row `row`."""
            cache.rows = list(range(1, size))
            cache.rows.insert(row, 0)
            idx = torch.randint(0, 97, (size, 1))
            idx[row] = 11
            logits = model(idx, kv_cache=cache)[0][row, -1]
            for slot in cache.rows:
                cache.occupy(slot, lengths[slot])  # forget the step
            return logits

        reference = step(16, 9)
        for size in engine.step_sizes:
            for row in {0, size // 2, size - 1}:
                assert torch.equal(step(size, row), reference), (size, row)


def test_where_a_full_steps_rows_differ_the_engine_says_so_and_feeds_every_slot(model, tokenizer, monkeypatch,
                                                                               caplog):
    monkeypatch.setattr("gptforge.serve.engine.invariant_step_sizes", lambda model, cache: ())
    assert Engine(model, tokenizer, max_batch=6).step_sizes == (6,)
    assert "--batch_invariant cannot keep its guarantee on this machine" in caplog.text


PROMPTS = ["To be", "a", "Shall I compare thee", "xyz xyz", "Now is the winter of our", "q"]


def test_a_seeded_sample_is_the_same_alone_or_beside_1_to_15_others(model, tokenizer):
    """Tokens and logprobs bit for bit, joining while 1 to 15 others of other lengths decode and end one after
    the other; each step has the smallest step size that holds its busy slots, and so every size is used."""
    engine = Engine(model, tokenizer, max_batch=16, max_queue=16)
    steps = []  # (rows, busy rows) of each decode step

    def spy(_, args, kwargs):
        if kwargs.get("kv_cache") is engine.cache:
            steps.append((len(engine.cache.rows), sum(engine.cache.busy[s] for s in engine.cache.rows)))

    hook = model.register_forward_pre_hook(spy, with_kwargs=True)
    engine.start()
    try:
        mine = {"seed": 7, "max_tokens": 40, "temperature": 0.9, "logprobs": 2}
        _, alone = submit(engine, tokenizer, "To be, or not", **mine)
        assert alone.done.wait(30)
        for k in range(1, 16):
            others = [submit(engine, tokenizer, PROMPTS[i % 6] + "!" * (i % 4), seed=100 * k + i,
                             max_tokens=3 + (7 * i + k) % 30, top_k=(None, 5)[i % 2],
                             logprobs=(None, 1)[k % 2])[1] for i in range(k)]
            while not any(c.pieces for c in others):
                time.sleep(0.001)
            _, together = submit(engine, tokenizer, "To be, or not", **mine)
            assert together.done.wait(30) and all(c.done.wait(30) for c in others)
            assert together.samples() == alone.samples() and together.logprobs() == alone.logprobs(), k
    finally:
        hook.remove()
        engine.stop()
    assert all(size == min(s for s in engine.step_sizes if s >= busy) for size, busy in steps)
    assert {size for size, _ in steps} == set(engine.step_sizes)


def test_a_seeded_completion_is_the_same_alone_or_beside_others_through_the_api(model, tokenizer):
    """Text and logprobs (JSON numbers, so bit for bit) of a request alone, and joining 1, 4 and 15 others
    of other lengths while they decode through the HTTP API."""
    engine = Engine(model, tokenizer, max_batch=16, max_queue=16)
    app = create_app(engine, "tiny", ServeOptions(max_tokens_limit=60))
    mine = {"prompt": "To be, or not", "seed": 7, "max_tokens": 40, "temperature": 0.9, "logprobs": 2}

    def complete(url: str, body: dict) -> tuple[str, dict]:
        with httpx.Client(base_url=url, timeout=60) as client:
            response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        [choice] = response.json()["choices"]
        return choice["text"], choice["logprobs"]

    with serve_in_thread(app) as url, ThreadPoolExecutor(16) as pool:
        alone = complete(url, mine)
        for k in (1, 4, 15):
            others = [pool.submit(complete, url, {"prompt": PROMPTS[i % 6], "seed": i, "top_k": 5,
                                                  "max_tokens": 5 + 11 * i % 30}) for i in range(k)]
            while not engine.occupancy()["busy"]:
                time.sleep(0.001)
            assert complete(url, mine) == alone, k
            assert all(other.result()[0] for other in others)


def full_logprobs(model: GPT, ids: list[int]) -> torch.Tensor:
    """log-softmax of a full forward's logits at every position of `ids`: (len(ids), vocab)."""
    with torch.inference_mode():
        logits, _ = model(torch.tensor([ids]), targets=torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), dim=-1)


def test_logprobs_are_the_models_before_sampling_and_the_prompt_is_scored(engine, tokenizer, model):
    """A drawn token's logprob and its alternatives are the raw model's log-softmax (temperature, top-k and
    logit_bias change what is drawn, not that); a prompt's tokens each given those before it, the first
    with none; max_tokens 0 only scores."""
    prompt = tokenizer.encode("Shall I compare")
    _, sampled = submit(engine, tokenizer, "Shall I compare", n=2, seed=5, max_tokens=12, logprobs=4,
                        temperature=0.7, top_k=20, logit_bias=((3, 1.5),), prompt_logprobs=True)
    assert sampled.done.wait(30)
    for index, (text, _, _) in enumerate(sampled.samples()):
        drawn = sampled.logprobs(index)
        ids = prompt + [e.token for e in drawn]
        assert tokenizer.decode(ids[len(prompt):]) == text
        reference = full_logprobs(model, ids)
        for position, entry in enumerate(drawn, start=len(prompt) - 1):
            assert entry.logprob == pytest.approx(float(reference[position, entry.token]), abs=1e-5)
            values, tops = reference[position].topk(4)
            assert [t for t, _ in entry.top] == tops.tolist()
            assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-5)
        [first] = [p for p in sampled.pieces if p.index == index and p.prompt is not None]
        assert first.text == "" and first.finish_reason is None  # the prompt's scores come at once
        assert first.prompt[0] == TokenLogprob(prompt[0], None, None)
        reference = full_logprobs(model, prompt)
        for position, entry in enumerate(first.prompt[1:]):
            assert entry.token == prompt[position + 1] and len(entry.top) == 4
            assert entry.logprob == pytest.approx(float(reference[position, entry.token]), abs=1e-5)
    _, scored = submit(engine, tokenizer, "Shall I compare", max_tokens=0, logprobs=0, prompt_logprobs=True)
    assert scored.done.wait(30)
    [piece] = scored.pieces
    assert (piece.text, piece.finish_reason, piece.tokens, piece.logprobs) == ("", "length", 0, ())
    assert [(e.token, e.logprob) for e in piece.prompt] == [(e.token, e.logprob) for e in first.prompt]
    assert all(e.top == () for e in piece.prompt[1:])
    assert engine.occupancy()["busy"] == 0


def steered_decode(model: GPT, ids: list[int], steps: int, bias: dict[int, float], presence: float,
                   frequency: float) -> list[int]:
    """Greedy decoding by OpenAI's formula, with a full forward per token: logit + bias - count * frequency
    - (count > 0) * presence, counts of the tokens drawn so far."""
    counts = torch.zeros(model.config.vocab_size)
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            logits = model(torch.tensor([ids + out]))[0][0, -1].float()
            for token, value in bias.items():
                logits[token] += value
            token = int((logits - counts * frequency - (counts > 0).float() * presence).argmax())
            counts[token] += 1
            out.append(token)
    return out


@pytest.mark.parametrize(("bias", "presence", "frequency"), [
    ({}, 1.5, 0.0), ({}, -0.5, 0.8), ({12: -3.0, 40: 2.0}, 0.7, 0.3),
])
def test_logit_bias_and_penalties_steer_as_openais_formula(engine, tokenizer, model, bias, presence,
                                                           frequency):
    prompt = tokenizer.encode("abc")
    expected = steered_decode(model, prompt, 20, bias, presence, frequency)
    steered = run(engine, tokenizer, "abc", temperature=0, max_tokens=20, logit_bias=tuple(bias.items()),
                  presence_penalty=presence, frequency_penalty=frequency)
    assert steered[0][0] == tokenizer.decode(expected)
    assert steered != run(engine, tokenizer, "abc", temperature=0, max_tokens=20)


def test_a_bias_of_100_makes_a_token_certain_and_minus_100_rules_it_out(engine, tokenizer):
    assert run(engine, tokenizer, "abc", max_tokens=10, seed=1, logit_bias=((20, 100.0),))[0][0] == (
        tokenizer.decode([20]) * 10)
    plain = run(engine, tokenizer, "abc", temperature=0, max_tokens=10)[0][0]
    banned = run(engine, tokenizer, "abc", temperature=0, max_tokens=10,
                 logit_bias=((tokenizer.encode(plain[0])[0], -100.0),))[0][0]
    assert plain[0] not in banned


def test_greedy_is_the_argmax_continuation(engine, tokenizer, model):
    text = run(engine, tokenizer, "Shall I", temperature=0, max_tokens=30)[0][0]
    with torch.inference_mode():
        ids = model.generate(torch.tensor([tokenizer.encode("Shall I")]), 30, temperature=0)[0, 7:]
    assert text == tokenizer.decode(ids.tolist())


def test_samples_of_one_job_draw_as_consecutive_seeds(engine, tokenizer):
    samples = run(engine, tokenizer, "hello", n=3, seed=10)
    assert len({text for text, _, _ in samples}) == 3
    assert [run(engine, tokenizer, "hello", seed=10 + i)[0] for i in range(3)] == samples


def test_end_of_text_and_stop_strings_end_a_sample(engine, tokenizer):
    greedy = run(engine, tokenizer, "abc", temperature=0, max_tokens=30)[0][0]
    eot = tokenizer.encode(greedy[12])[0]
    tokenizer.eot_token = eot  # pretend that character is end-of-text
    cut = greedy.index(greedy[12])
    assert run(engine, tokenizer, "abc", temperature=0, max_tokens=30)[0] == (greedy[:cut], "stop", cut + 1)
    tokenizer.eot_token = None
    stop = greedy[5:8]
    assert run(engine, tokenizer, "abc", temperature=0, max_tokens=30, stop=(stop, "never"))[0][:2] == (
        greedy[: greedy.index(stop)], "stop")


def test_a_jobs_own_stop_tokens_end_it_unseen_beside_jobs_that_stop_at_end_of_text(engine, tokenizer):
    """A chat job stops at its end-of-turn id (`Sampling.stop_tokens`), a completion at end-of-text, side by
    side in one batch; a job's own set replaces end-of-text."""
    greedy = run(engine, tokenizer, "abc", temperature=0, max_tokens=30)[0][0]
    end = frozenset(tokenizer.encode(greedy[12]))
    cut = greedy.index(greedy[12])
    assert run(engine, tokenizer, "abc", temperature=0, max_tokens=30, stop_tokens=end)[0] == (
        greedy[:cut], "stop", cut + 1)
    tokenizer.eot_token = tokenizer.encode(greedy[3])[0]
    try:
        _, own = submit(engine, tokenizer, "abc", temperature=0, max_tokens=30, stop_tokens=end)
        _, eot = submit(engine, tokenizer, "abc", temperature=0, max_tokens=30)  # None: end-of-text
        _, none = submit(engine, tokenizer, "abc", temperature=0, max_tokens=30, stop_tokens=frozenset())
        assert own.done.wait(30) and eot.done.wait(30) and none.done.wait(30)
    finally:
        tokenizer.eot_token = None
    eot_cut = greedy.index(greedy[3])
    assert own.samples() == [(greedy[:cut], "stop", cut + 1)]
    assert eot.samples() == [(greedy[:eot_cut], "stop", eot_cut + 1)]
    assert none.samples() == [(greedy, "length", 30)]


def test_cancel_frees_the_slots_at_once(engine, tokenizer):
    job, collector = submit(engine, tokenizer, "x", n=3, max_tokens=60)
    _, other_collector = submit(engine, tokenizer, "y", max_tokens=50, seed=5)
    while not collector.pieces:
        time.sleep(0.001)
    engine.cancel(job)
    deadline = time.monotonic() + 1
    while engine.occupancy()["busy"] > 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    assert engine.occupancy()["busy"] <= 1  # the other job may still run
    assert other_collector.done.wait(30)
    assert other_collector.samples() == run(engine, tokenizer, "y", max_tokens=50, seed=5)
    assert not collector.done.is_set()  # a cancelled job's reader is gone: it gets nothing more


def test_the_queue_is_bounded(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    engine.start()
    try:
        running, collector = submit(engine, tokenizer, "a", max_tokens=60)
        while not collector.pieces:
            time.sleep(0.001)
        waiting, _ = submit(engine, tokenizer, "b")
        with pytest.raises(QueueFull, match="bound is 1"):
            submit(engine, tokenizer, "c")
        assert engine.occupancy() == {"busy": 1, "waiting": 1, "slots": 1}
        engine.cancel(waiting)
        engine.cancel(running)
        assert run(engine, tokenizer, "d", max_tokens=3)[0][1:] == ("length", 3)  # room again
    finally:
        engine.stop()


def test_jobs_that_cannot_run_are_refused(engine, tokenizer):
    for prompt, n, max_tokens, param in [("a" * 60, 1, 5, "max_tokens"), ("a", 7, 5, "n"),
                                         ("", 1, 5, "prompt")]:
        with pytest.raises(InvalidJob) as error:
            submit(engine, tokenizer, prompt, n, max_tokens=max_tokens)
        assert error.value.param == param
    with pytest.raises(InvalidJob, match=r"maximum context length is 64 tokens.*65 tokens"):
        submit(engine, tokenizer, "a" * 60, max_tokens=5)
    with pytest.raises(InvalidJob, match="token ids the 97-token model"):
        engine.submit([Job([97], 1, Sampling(max_tokens=1), Collector(1))])
    with pytest.raises(InvalidJob, match="token ids the 97-token model"):
        engine.submit([Job([-1], 1, Sampling(max_tokens=1), Collector(1))])
    with pytest.raises(InvalidJob, match="logit_bias has token ids the 97-token model") as error:
        engine.submit([Job([1], 1, Sampling(max_tokens=1, logit_bias=((97, 1.0),)), Collector(1))])
    assert error.value.param == "logit_bias"
    with pytest.raises(InvalidJob, match="at most 8 prompts in one request"):
        engine.submit([Job([1], 1, Sampling(max_tokens=1), Collector(1)) for _ in range(9)])
    assert engine.occupancy()["waiting"] == 0  # all or none


def test_a_failed_step_fails_its_jobs_and_the_engine_goes_on(model, tokenizer, monkeypatch):
    engine = Engine(model, tokenizer, max_batch=2)
    engine.start()
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        monkeypatch.setattr(engine, "_decode", broken)
        _, collector = submit(engine, tokenizer, "a")
        assert collector.done.wait(30)
        assert collector.pieces[-1].error == "the engine failed: RuntimeError: boom"
        assert engine.occupancy()["busy"] == 0
        monkeypatch.undo()
        assert run(engine, tokenizer, "a", max_tokens=4)[0][1:] == ("length", 4)
    finally:
        engine.stop()


def test_stop_fails_what_is_in_flight_and_refuses_more(model, tokenizer):
    engine = Engine(model, tokenizer, max_batch=1)
    engine.start()
    _, collector = submit(engine, tokenizer, "a", max_tokens=60)
    _, waiting = submit(engine, tokenizer, "b")
    engine.stop()
    for c in (collector, waiting):
        assert c.done.is_set() and c.pieces[-1].error == "the server is shutting down"
    with pytest.raises(EngineStopped):
        submit(engine, tokenizer, "c")
