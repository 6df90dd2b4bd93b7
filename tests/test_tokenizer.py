"""Tests for gptforge.tokenizer: char, gpt2 (tiktoken, offline from the mirror) and bpe (HF tokenizers).

.venv/bin/python -m pytest tests/test_tokenizer.py
"""

import shutil

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mirror_data import MIRROR, SHAKESPEARE, WAR_AND_PEACE, needs_mirror, reference_gpt2

from gptforge.errors import GptforgeError
from gptforge.tokenizer import EOT, BPETokenizer, CharTokenizer, GPT2Tokenizer, from_spec, gpt2_encoding

EOT_AS_TEXT = [27, 91, 437, 1659, 5239, 91, 29]  # "<|endoftext|>" encoded as ordinary text by GPT-2


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer(MIRROR)


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train([SHAKESPEARE.read_text(encoding="utf-8")], vocab_size=512)


# ---- char


def test_char_vocabulary_is_the_sorted_distinct_characters():
    tok = CharTokenizer.from_text(["hello ", "world"])
    assert tok.chars == " dehlorw" and tok.vocab_size == 8 and tok.eot_token is None
    assert tok.encode("hello world") == [3, 2, 4, 4, 5, 0, 7, 5, 6, 4, 1]
    assert tok.decode([3, 2, 4, 4, 5]) == "hello"
    assert tok.encode_to_numpy("low").dtype == np.uint32


def test_char_out_of_vocabulary_names_the_character():
    tok = CharTokenizer("abc")
    with pytest.raises(
        GptforgeError, match=r"character 'é' \(U\+00E9\) at position 2 is not in .* 3-character"
    ):
        tok.encode("abé")
    with pytest.raises(GptforgeError, match="character '😀'"):  # beyond the lookup table of code points
        tok.encode("😀")
    with pytest.raises(GptforgeError, match=r"token ids must be in \[0, 3\)"):
        tok.decode([0, 3])
    with pytest.raises(GptforgeError, match="distinct"):
        CharTokenizer("aa")


@given(st.text(alphabet="\n !$&',-.3:;?abcXYZé中😀", max_size=200))
def test_char_round_trip(text):
    tok = CharTokenizer("\n !$&',-.3:;?abcXYZé中😀")
    assert tok.decode(tok.encode(text)) == text


# ---- gpt2


@needs_mirror
def test_gpt2_from_the_mirror_files(gpt2):
    assert gpt2.vocab_size == 50257 and gpt2.eot_token == 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode(" the") == [262]
    assert gpt2.encode(EOT) == EOT_AS_TEXT  # ordinary text, as nanoGPT's encode_ordinary
    assert gpt2.spec()["kind"] == "gpt2"


@needs_mirror
@pytest.mark.parametrize(("path", "count"), [(SHAKESPEARE, 338_025), (WAR_AND_PEACE, 921_390)])
def test_gpt2_matches_tiktoken_get_encoding(gpt2, path, count):
    text = path.read_bytes().decode("utf-8")  # not read_text: that would turn War and Peace's CRLFs into LFs
    ids = gpt2.encode_to_numpy(text)
    assert len(ids) == count  # the counts the mirror README verified
    assert ids.tolist() == reference_gpt2().encode_ordinary(text) == gpt2.encode(text)
    assert gpt2.decode(ids) == text


@needs_mirror
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_gpt2_round_trip(gpt2, text):
    ids = gpt2.encode(text)
    assert gpt2.decode(ids) == text
    assert gpt2.encode_to_numpy(text).tolist() == ids


def test_gpt2_mirror_with_a_wrong_file_is_an_error(tmp_path):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "encoder.json").write_text("{}")
    (tmp_path / "gpt2" / "vocab.bpe").write_text("#version: 0.2\n")
    with pytest.raises(GptforgeError, match=r"encoder.json has sha256 .* replace it with the original file"):
        gpt2_encoding(tmp_path)


@needs_mirror
def test_gpt2_reads_the_mirror_named_by_the_environment(monkeypatch, tmp_path):
    gpt2_encoding.cache_clear()
    (tmp_path / "gpt2").mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(MIRROR / "gpt2" / name, tmp_path / "gpt2" / name)
    monkeypatch.setenv("GPTFORGE_DATA_MIRROR", str(tmp_path))
    assert GPT2Tokenizer().encode("Hello world") == [15496, 995]
    assert gpt2_encoding.cache_info().currsize == 1  # built once, from tmp_path


# ---- bpe


@needs_mirror
def test_bpe_trains_to_the_requested_size(bpe):
    assert bpe.vocab_size == 512 and bpe.eot_token == 0
    assert bpe.encode(EOT) != [bpe.eot_token]  # special-token text stays ordinary text
    text = SHAKESPEARE.read_text(encoding="utf-8")[:5000]
    ids = bpe.encode(text)
    assert len(ids) < 0.6 * len(text)  # merges learned from Shakespeare compress Shakespeare (ASCII)
    assert max(ids) < 512 and bpe.decode(ids) == text


@needs_mirror
@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_bpe_round_trip(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert bpe.encode_to_numpy(text).tolist() == ids


@needs_mirror
def test_bpe_saved_and_reloaded_through_its_spec(bpe, tmp_path):
    bpe.save(tmp_path / BPETokenizer.FILE)
    again = from_spec(bpe.spec(), tmp_path)
    text = "To be, or not to be: that is the question.\n"
    assert isinstance(again, BPETokenizer) and again.encode(text) == bpe.encode(text)
    (tmp_path / BPETokenizer.FILE).write_text(BPETokenizer.train(["other text"], 300).to_json())
    with pytest.raises(GptforgeError, match="not the tokenizer this dataset was prepared with"):
        from_spec(bpe.spec(), tmp_path)
    (tmp_path / BPETokenizer.FILE).unlink()
    with pytest.raises(GptforgeError, match=r"tokenizer.json is missing; re-run `gptforge prepare`"):
        from_spec(bpe.spec(), tmp_path)


def test_bpe_vocab_smaller_than_the_bytes_is_an_error():
    with pytest.raises(GptforgeError, match="--vocab_size=256 is too small"):
        BPETokenizer.train(["abc"], 256)


def test_from_spec_rejects_an_unknown_kind(tmp_path):
    with pytest.raises(GptforgeError, match="unknown tokenizer kind 'sentencepiece'"):
        from_spec({"kind": "sentencepiece"}, tmp_path)
    assert from_spec(CharTokenizer("ab").spec(), tmp_path).encode("ba") == [1, 0]
