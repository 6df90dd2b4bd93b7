"""Tests for gptforge.sample and gptforge.runs: seeded determinism, streaming of complete text only, the run's
own tokenizer, and one-line errors for bad options.

    .venv/bin/python -m pytest tests/test_sample.py
"""

import io
import re

import pytest
import torch
from mirror_data import MIRROR, needs_mirror
from tiny_run import SONNET, tiny_run

from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.options import apply_overrides
from gptforge.runs import load_run, run_tokenizer
from gptforge.sample import SEPARATOR, SampleOptions, sample
from gptforge.tokenizer import REPLACEMENT, BPETokenizer, CharTokenizer, GPT2Tokenizer, TextStream

MULTIBYTE = "naïve café, déjà vu — 東京 🤖 👩‍👩‍👧 done"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("sample"))


def options(run, **overrides) -> SampleOptions:
    base = {"out_dir": str(run), "num_samples": 2, "max_new_tokens": 40, "device": "cpu", "start": "Shall I"}
    return apply_overrides(SampleOptions(), {**base, **overrides})


def test_same_seed_same_text_other_seed_other_text(run):
    first = sample(options(run), out=io.StringIO())
    again = sample(options(run), out=io.StringIO())
    other = sample(options(run, seed=7), out=io.StringIO())
    assert first == again
    assert first != other
    assert first[0] != first[1]  # the samples of one call are successive draws, not copies
    for text in first:
        assert text.startswith("Shall I")
        assert len(text) == len("Shall I") + 40  # one character per token
        assert set(text) <= set(SONNET)


def test_streamed_text_is_the_whole_text_written_piece_by_piece(run):
    class Writes(io.StringIO):
        count = 0

        def write(self, s: str) -> int:
            self.count += 1
            return super().write(s)

    streamed, whole = Writes(), Writes()
    texts = sample(options(run), out=streamed)
    assert sample(options(run, stream=False), out=whole) == texts
    assert streamed.getvalue() == whole.getvalue() == "".join(f"{t}\n{SEPARATOR}\n" for t in texts)
    assert streamed.count > 40 and whole.count == 2  # a write per token, against one per sample


def test_greedy_sampling_is_the_argmax_continuation(run):
    text = sample(options(run, temperature=0, num_samples=1, max_new_tokens=10), out=io.StringIO())[0]
    loaded = load_run(run)
    ids = loaded.tokenizer.encode("Shall I")
    expected = loaded.model.generate(torch.tensor([ids]), 10, temperature=0)[0].tolist()
    assert text == loaded.tokenizer.decode(expected)


def test_prompt_from_a_file(run, tmp_path):
    (tmp_path / "prompt.txt").write_text("Thou art", encoding="utf-8")
    texts = sample(options(run, start=f"FILE:{tmp_path / 'prompt.txt'}", num_samples=1), out=io.StringIO())
    assert texts[0].startswith("Thou art") and len(texts[0]) == len("Thou art") + 40


def test_latest_and_best_checkpoints_are_both_readable(run):
    best, latest = load_run(run, "best"), load_run(run, "latest")
    assert best.checkpoint["best_val_loss"] == min(
        best.checkpoint["best_val_loss"], latest.checkpoint["best_val_loss"]
    )
    assert latest.checkpoint["iter_num"] == 20


def byte_level_bpe() -> BPETokenizer:
    """257 tokens: the 256 bytes and end-of-text, no merges,
    so every non-ASCII character spans several tokens."""
    return BPETokenizer.train([MULTIBYTE], vocab_size=257)


@pytest.mark.parametrize("make", [
    byte_level_bpe,
    pytest.param(lambda: GPT2Tokenizer(MIRROR), marks=needs_mirror, id="gpt2"),
])
def test_text_stream_emits_only_complete_characters(make):
    tokenizer = make()
    ids = tokenizer.encode(MULTIBYTE)
    assert REPLACEMENT in "".join(tokenizer.decode([i]) for i in ids)  # some tokens are parts of a character
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids]
    pieces.append(stream.flush())
    assert "".join(pieces) == MULTIBYTE
    assert "" in pieces[:-1]  # some tokens were held back until their character was complete
    assert not any(REPLACEMENT in piece for piece in pieces)


def test_text_stream_flushes_an_incomplete_tail():
    tokenizer = byte_level_bpe()
    stream = TextStream(tokenizer)
    first_byte_of_e_acute = tokenizer.encode("é")[0]
    assert stream.push(first_byte_of_e_acute) == ""
    assert stream.flush() == REPLACEMENT


def test_tokenizer_comes_from_the_dataset_when_the_checkpoint_has_none(run):
    ckpt = dict(load_run(run).checkpoint)
    spec = ckpt.pop("tokenizer")
    tokenizer = run_tokenizer(ckpt, vocab_size=len(spec["chars"]))  # a nanoGPT-style checkpoint: meta.json
    assert isinstance(tokenizer, CharTokenizer) and tokenizer.chars == spec["chars"]
    with pytest.raises(GptforgeError, match="pass --data_dir"):
        run_tokenizer({"config": {"dataset": "gone", "data_dir": str(run)}}, vocab_size=65)
    assert isinstance(run_tokenizer({}, vocab_size=50304), GPT2Tokenizer)  # nanoGPT's fallback


@pytest.mark.parametrize(("args", "message"), [
    (["--start=café"], r"character 'é' \(U\+00E9\) at position 3 is not in this char tokenizer"),
    (["--temperature=-0.5"], "--temperature=-0.5 must be >= 0"),
    (["--top_p=0"], r"--top_p=0.0 must be in \(0, 1\]"),
    (["--top_p=1.5"], r"--top_p=1.5 must be in \(0, 1\]"),
    (["--start="], "--start is empty"),
    (["--start=FILE:/nonexistent/prompt.txt"], "cannot read it"),
    (["--nmu_samples=3"], "did you mean --num_samples"),
])
def test_bad_options_are_one_line_errors(run, capsys, args, message):
    assert main(["sample", f"--out_dir={run}", "--device=cpu", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("gptforge sample: error: ") and captured.err.count("\n") == 1
    assert re.search(message, captured.err)


def test_an_out_dir_without_a_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["sample", f"--out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--out_dir={tmp_path} holds no run (no ckpt.pt)" in err


def test_the_command_prints_samples(run, capsys):
    assert main(["sample", f"--out_dir={run}", "--device=cpu", "--num_samples=3", "--max_new_tokens=5",
                 "--start=So long"]) == 0
    out = capsys.readouterr().out
    assert out.count(SEPARATOR) == 3 and out.count("So long") >= 3


@pytest.mark.parametrize("overrides", [{"temperature": 1e-40}, {"top_p": 1e-300},
                                       {"temperature": 1e-30, "top_k": None},
                                       {"temperature": 1e-40, "top_p": 1e-300}])
def test_sampling_is_total_where_a_temperature_or_top_p_underflows(run, overrides):
    # a temperature whose division overflows, or a top_p below float32's range, is greedy: never a NaN draw
    texts = sample(options(run, num_samples=2, max_new_tokens=20, **overrides), out=io.StringIO())
    greedy = sample(options(run, num_samples=1, max_new_tokens=20, temperature=0), out=io.StringIO())[0]
    assert texts == [greedy, greedy]
