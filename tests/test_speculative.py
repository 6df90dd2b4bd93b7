"""Tests for gptforge.speculative: greedy speculative decoding gives plain greedy decoding's tokens (many
prompts and lengths, past the block_size, the model options, drafts of another depth, context or padded
vocabulary, several K); sampled tokens follow the target's distribution (chi-square, fixed seeds, vocabulary
of 8: the accept/reject rule alone, and whole rounds against the target's exact probabilities); the server's
engine decodes speculatively with its guarantees kept; the --draft options' one-line errors.

    .venv/bin/python -m pytest tests/test_speculative.py
"""

import math
import re
import time
import warnings

import pytest
import torch
from conftest import tiny_config
from mirror_data import needs_mirror
from test_model_options import OPTION_SETS, make_model
from test_serve import tiny_hf_dir
from test_serve_engine import CHARS, run, submit
from tiny_run import tiny_run

from gptforge import GPT
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.generate import next_token_probs
from gptforge.sample import SampleOptions
from gptforge.serve.engine import Engine
from gptforge.source import DraftOptions, Source
from gptforge.speculative import Speculator, accept, stream
from gptforge.tokenizer import CharTokenizer


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models in many small steps: one thread is faster, and steady on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def speculative(speculator: Speculator, prompt: torch.Tensor, n: int, **kwargs) -> list[int]:
    return [int(t) for t in stream(speculator, prompt, n, **kwargs)]


def plain(model: GPT, prompt: torch.Tensor, n: int, **kwargs) -> list[int]:
    return model.generate(prompt, n, **kwargs)[0, prompt.size(1):].tolist()


def greedy_agrees(speculator: Speculator, prompt: torch.Tensor, n: int) -> bool:
    return speculative(speculator, prompt, n, temperature=0) == plain(speculator.target, prompt, n,
                                                                      temperature=0)


def p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's chi-square test of `counts` against `probs`; cells expecting fewer than 5 are pooled."""
    expected = probs.double() * counts.sum()
    small = expected < 5
    observed = torch.cat([counts[~small].double(), counts[small].double().sum(0, keepdim=True)])
    expected = torch.cat([expected[~small], expected[small].sum(0, keepdim=True)])
    keep = expected > 0
    assert not (observed[~keep] > 0).any(), "a token the distribution rules out was drawn"
    observed, expected = observed[keep], expected[keep]
    stat = ((observed - expected) ** 2 / expected).sum()
    df = observed.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat / 2))


# -- greedy: plain decoding's tokens --


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
def test_greedy_is_plain_greedy_across_prompts_lengths_and_the_block_size(options):
    target = make_model(options, seed=0, block_size=24, n_layer=3)
    draft = make_model(options, seed=1, block_size=24, n_layer=1)
    speculator = Speculator(target, draft, draft_tokens=3)
    gen = torch.Generator().manual_seed(0)
    for length, new in [(1, 30), (5, 19), (7, 40), (20, 4), (23, 1), (24, 6), (30, 10)]:
        prompt = torch.randint(0, 97, (1, length), generator=gen)
        assert greedy_agrees(speculator, prompt, new)


def test_a_draft_that_is_the_target_is_always_accepted():
    target = make_model({}, seed=0, block_size=64)
    speculator = Speculator(target, target, draft_tokens=4)
    prompt = torch.tensor([[3, 1, 4]])
    assert speculative(speculator, prompt, 20, temperature=0) == plain(target, prompt, 20, temperature=0)
    assert speculative(speculator, prompt, 20, temperature=0.9, generator=torch.Generator().manual_seed(1))
    stats = speculator.acceptance
    assert stats.rate == 1.0 and stats.tokens == 40 and stats.rounds == 8


@pytest.mark.parametrize("k", [1, 2, 8])
@pytest.mark.parametrize(
    "draft_shape", [dict(n_layer=1), dict(block_size=12), dict(vocab_size=104), dict(vocab_size=90)],
    ids=["shallow", "short-context", "padded-vocab", "smaller-vocab"],
)
def test_greedy_is_plain_greedy_with_drafts_of_other_shapes_and_k(k, draft_shape):
    target = make_model({}, seed=0, block_size=32)
    draft = make_model({}, seed=2, **{"block_size": 32, **draft_shape})
    speculator = Speculator(target, draft, draft_tokens=k)
    gen = torch.Generator().manual_seed(k)
    for length, new in [(2, 40), (9, 23)]:
        prompt = torch.randint(0, 90, (1, length), generator=gen)
        assert greedy_agrees(speculator, prompt, new)


def test_greedy_draft_of_the_same_model_trained_less_agrees_often():
    """A draft close to the target (the target with noise on its weights) has most drafts accepted."""
    target = make_model({}, seed=0, block_size=64)
    draft = make_model({}, seed=0, block_size=64)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(0.002 * torch.randn_like(p))
    speculator = Speculator(target, draft, draft_tokens=4)
    prompt = torch.tensor([[5, 6, 7]])
    assert speculative(speculator, prompt, 50, temperature=0) == plain(target, prompt, 50, temperature=0)
    assert speculator.acceptance.rate > 0.5


def test_the_stream_ends_at_a_stop_token_and_at_max_new_tokens():
    target = make_model({}, seed=0, block_size=64)
    speculator = Speculator(target, make_model({}, seed=3, block_size=64, n_layer=1), draft_tokens=4)
    prompt = torch.tensor([[1, 2]])
    full = plain(target, prompt, 30, temperature=0)
    stop = full[12]
    first = full.index(stop)
    assert speculative(speculator, prompt, 30, temperature=0, stop_tokens=[stop]) == full[: first + 1]
    for n in (0, 1, 2, 5):
        assert speculative(speculator, prompt, n, temperature=0) == full[:n]
    with pytest.raises(ValueError, match="one sequence"):
        speculative(speculator, torch.tensor([[1], [2]]), 3)


# -- sampling: the target's distribution --


def test_the_accept_rule_draws_each_position_from_the_targets_distribution():
    """Draft tokens from q, kept by accept: the first token is distributed as p_1, the i-th (among rounds
    that reach it) as p_i, the bonus as p_K+1; and the test rejects q itself."""
    gen = torch.Generator().manual_seed(0)
    k, vocab, rounds = 3, 8, 6000
    target_logits = 2 * torch.randn(k + 1, vocab, generator=gen)
    draft_logits = target_logits[:k] + 1.5 * torch.randn(k, vocab, generator=gen)
    p, q = next_token_probs(target_logits, 1.0), next_token_probs(draft_logits, 1.0)
    counts = torch.zeros(k + 1, vocab)
    for _ in range(rounds):
        drafts = [int(torch.multinomial(q[i], 1, generator=gen)) for i in range(k)]
        for i, token in enumerate(accept(drafts, target_logits, list(q), 1.0, None, None, gen)):
            counts[i, token] += 1
    assert counts[0].sum() == rounds and 0 < counts[k].sum() < rounds  # corrections and bonus tokens
    for i in range(k + 1):
        assert p_value(counts[i], p[i]) > 1e-3
    assert p_value(counts[0], q[0]) < 1e-6  # the test has the power to tell q from p


@pytest.mark.slow  # about 10 s each
@pytest.mark.parametrize("filters", [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
                                     dict(temperature=1.3, top_p=0.8)], ids=["plain", "top_k", "top_p"])
def test_speculative_samples_follow_the_targets_distribution(filters):
    """Whole rounds of tiny models with 8 tokens: the joint of the first two new tokens and the third's
    marginal match the target's exact probabilities (full forwards over every prefix)."""
    config = dict(vocab_size=8, block_size=16, n_embd=16, n_head=2)
    target = make_model({"logit_softcap": 30.0}, seed=0, n_layer=2, **config)
    draft = make_model({"logit_softcap": 30.0}, seed=1, n_layer=1, **config)
    speculator = Speculator(target, draft, draft_tokens=2)
    prompt = torch.tensor([[1, 5, 2]])

    def probs(prefix: torch.Tensor) -> torch.Tensor:  # the target's next-token distribution, all prefixes
        with torch.inference_mode():
            return next_token_probs(target(prefix)[0][:, -1], **filters)

    first = probs(prompt)[0]
    pairs = torch.cat([prompt.expand(8, -1), torch.arange(8)[:, None]], dim=1)
    second = probs(pairs)  # (8, 8): row t1
    joint = first[:, None] * second
    triples = torch.cat([pairs.repeat_interleave(8, 0), torch.arange(8).repeat(8)[:, None]], dim=1)
    third = (joint.reshape(-1, 1) * probs(triples)).sum(0)

    gen = torch.Generator().manual_seed(4)
    samples = torch.tensor([speculative(speculator, prompt, 3, generator=gen, **filters)
                            for _ in range(1500)])
    pair_counts = torch.bincount(samples[:, 0] * 8 + samples[:, 1], minlength=64).float()
    assert p_value(pair_counts, joint.reshape(-1)) > 1e-3
    assert p_value(torch.bincount(samples[:, 2], minlength=8).float(), third) > 1e-3
    assert 0 < speculator.acceptance.rate < 1


# -- the server's engine --


@pytest.fixture(scope="module")
def models() -> tuple[GPT, GPT]:
    torch.manual_seed(1234)
    target = GPT(tiny_config()).eval()
    draft = make_model({}, seed=5, n_layer=1)
    return target, draft


@pytest.fixture
def tokenizer() -> CharTokenizer:
    return CharTokenizer(CHARS)


def engine(target: GPT, draft: GPT | None, **kwargs) -> Engine:
    engine = Engine(target, CharTokenizer(CHARS), max_batch=4, max_queue=8, draft=draft, **kwargs)
    engine.start()
    return engine


def test_the_engine_decodes_greedy_requests_as_without_a_draft(models, tokenizer):
    target, draft = models
    plain_engine, drafted = engine(target, None), engine(target, draft, draft_tokens=3)
    try:
        for prompt, max_tokens in [("To be", 40), ("a", 63), ("Shall I compare", 7)]:
            want = run(plain_engine, tokenizer, prompt, temperature=0, max_tokens=max_tokens)
            assert run(drafted, tokenizer, prompt, temperature=0, max_tokens=max_tokens) == want
        assert drafted.speculator is not None and drafted.speculator.acceptance.proposed > 0
        assert drafted.fingerprint != plain_engine.fingerprint
    finally:
        plain_engine.stop()
        drafted.stop()


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_a_speculative_seeded_sample_is_the_same_alone_or_among_others(models, tokenizer, batch_invariant):
    """Beside plain samples (logprobs, penalties: they decode as without a draft) and other speculative ones,
    joining while they decode."""
    target, draft = models
    drafted = engine(target, draft, batch_invariant=batch_invariant)
    plain_engine = engine(target, None, batch_invariant=batch_invariant)
    try:
        alone = run(drafted, tokenizer, "To be, or not", seed=3, max_tokens=40)
        steered = {"seed": 1, "max_tokens": 30, "logprobs": 2, "frequency_penalty": 0.5}
        want_steered = run(plain_engine, tokenizer, "Shall I", 2, **steered)
        crowd = [submit(drafted, tokenizer, "Shall I", 2, **steered)[1],
                 submit(drafted, tokenizer, "abc", seed=None, max_tokens=50, temperature=0.5, top_k=5)[1]]
        while not crowd[0].pieces:  # join while the others are decoding
            time.sleep(0.001)
        again = run(drafted, tokenizer, "To be, or not", seed=3, max_tokens=40)
        assert all(c.done.wait(30) for c in crowd)
        assert again == alone and alone[0][1:] == ("length", 40)
        assert crowd[0].samples() == want_steered
        assert run(drafted, tokenizer, "To be, or not", seed=4, max_tokens=40) != alone
    finally:
        drafted.stop()
        plain_engine.stop()


# -- options --


def fake_source(vocab: str, n_layer: int = 1, name: str = "m") -> Source:
    model = make_model({}, n_layer=n_layer, vocab_size=len(vocab))
    return Source(model, CharTokenizer(vocab), None, name)


def test_draft_options_refuse_a_draft_with_another_tokenizer(monkeypatch):
    opts = DraftOptions(draft="small-run")
    target = fake_source(CHARS, n_layer=2, name="big-run")
    monkeypatch.setattr("gptforge.source.load_source", lambda *a, **k: fake_source(CHARS[::-1]))
    with pytest.raises(GptforgeError, match=r"--draft=small-run has another tokenizer .* than the model "
                                            r"big-run .*must share the model's tokenizer"):
        opts.load_draft(target)
    monkeypatch.setattr("gptforge.source.load_source", lambda *a, **k: fake_source(CHARS, n_layer=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert opts.load_draft(target).model.config.n_layer == 1
    monkeypatch.setattr("gptforge.source.load_source", lambda *a, **k: fake_source(CHARS, n_layer=3))
    with pytest.warns(UserWarning, match="not smaller makes decoding slower"):
        opts.load_draft(target)
    assert DraftOptions().load_draft(target) is None


@pytest.mark.parametrize(("options", "message"), [
    (dict(draft_tokens=3), r"--draft_tokens=3 needs a draft model: add --draft=RUN"),
    (dict(draft="d", draft_tokens=0), r"--draft_tokens=0 must be at least 1"),
    (dict(draft="resume"), r"--draft=resume: name the draft's run directory"),
])
def test_draft_options_errors(options, message):
    with pytest.raises(GptforgeError, match=message):
        DraftOptions(**options)


def test_sample_refuses_draft_with_compile():
    with pytest.raises(GptforgeError, match="--compile=True cannot be combined with --draft"):
        SampleOptions(draft="d", compile=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("speculative"))


@pytest.mark.slow  # trains a tiny run
def test_sample_with_a_draft_prints_plain_greedy_text_and_the_acceptance(tiny, capsys):
    args = ["sample", f"--out_dir={tiny}", "--device=cpu", "--temperature=0", "--num_samples=2",
            "--max_new_tokens=50", "--start=Shall I"]
    assert main(args) == 0
    want = capsys.readouterr().out
    with pytest.warns(UserWarning, match=f"--draft={tiny} has .* a draft that is not smaller"):
        assert main([*args, f"--draft={tiny}", "--draft_tokens=3"]) == 0
    captured = capsys.readouterr()
    assert captured.out == want
    assert re.fullmatch(r"speculative decoding: \d+ of \d+ draft tokens accepted \(100%\), "
                        r"[\d.]+ tokens per forward of the model\n", captured.err)


@needs_mirror
@pytest.mark.slow  # trains a tiny run
def test_serve_refuses_a_draft_with_another_tokenizer_in_one_line(tiny, tmp_path, capsys):
    model_dir = tiny_hf_dir(tmp_path / "tiny-gpt2")  # GPT-2's tokenizer; the tiny run's is a char one
    capsys.readouterr()  # what transformers printed writing it
    assert main(["serve", f"--init_from={model_dir}", f"--draft={tiny}", "--port=0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gptforge serve: error: --draft={tiny} has another "
                                                   "tokenizer (char, ")
    assert f"than the model {model_dir} (gpt2, 50257 tokens" in err


@pytest.mark.parametrize("command", ["sample", "serve", "chat"])
def test_draft_tokens_without_a_draft_is_a_one_line_error(command, capsys):
    assert main([command, "--draft_tokens=2"]) == 2
    err = capsys.readouterr().err
    assert err == f"gptforge {command}: error: --draft_tokens=2 needs a draft model: add --draft=RUN\n"


def test_p_value_is_uniformish_on_the_null():
    """The chi-square helper itself: exact counts give p = 1, far ones p ~ 0."""
    probs = torch.tensor([0.5, 0.25, 0.25])
    assert math.isclose(p_value(torch.tensor([50.0, 25.0, 25.0]), probs), 1.0)
    assert p_value(torch.tensor([90.0, 5.0, 5.0]), probs) < 1e-6
