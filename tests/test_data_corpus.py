"""Tests for gptforge.data.corpus: text streamed in pieces cut where the tokens cannot change, and located
decoding errors. (Corpora and inputs are tested through `gptforge prepare` in test_data_prepare.py.)

    .venv/bin/python -m pytest tests/test_data_corpus.py
"""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mirror_data import MIRROR, SHAKESPEARE, WAR_AND_PEACE, needs_mirror, reference_gpt2

from gptforge.data.corpus import cut_point, read_text
from gptforge.errors import GptforgeError
from gptforge.tokenizer import BPETokenizer, GPT2Tokenizer


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer(MIRROR)


# ---- streaming: pieces cut where the tokens cannot change


@needs_mirror
@pytest.mark.parametrize(("path", "chunk"), [(SHAKESPEARE, 4096), (WAR_AND_PEACE, 65536)])
def test_streamed_pieces_encode_like_the_whole_text(gpt2, path, chunk):
    text = path.read_bytes().decode("utf-8")  # War and Peace has CRLFs and curly quotes: both kept
    pieces = list(read_text(path, chunk_bytes=chunk))
    assert "".join(pieces) == text and len(pieces) >= len(text.encode()) // chunk
    assert all(
        a[-1].isascii() and a[-1].isprintable() and b[0] in " \n" for a, b in itertools.pairwise(pieces)
    )
    ids = np.concatenate([gpt2.encode_to_numpy(piece) for piece in pieces])
    assert ids.tolist() == reference_gpt2().encode_ordinary(text)


@needs_mirror
@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=[*"ab sZé中1 \n\t\r.,'!-", "\u00a0", "\u2028", "\u3000", "’", "😀"], max_size=80),
    st.data(),
)
def test_cut_point_keeps_gpt2_and_bpe_tokens(gpt2, bpe_512, text, data):
    cut = cut_point(text[: data.draw(st.integers(0, len(text)))])
    for tokenizer in (gpt2, bpe_512):
        assert tokenizer.encode(text[:cut]) + tokenizer.encode(text[cut:]) == tokenizer.encode(text)


@pytest.fixture(scope="module")
def bpe_512() -> BPETokenizer:
    return BPETokenizer.train([SHAKESPEARE.read_text(encoding="utf-8")], vocab_size=512)


def test_text_without_spaces_is_still_read_in_bounded_pieces(tmp_path):
    (tmp_path / "a.txt").write_text("a" * 300_000)
    pieces = list(read_text(tmp_path / "a.txt", chunk_bytes=1024))
    assert "".join(pieces) == "a" * 300_000 and max(map(len, pieces)) <= 65 * 1024


@pytest.mark.parametrize(
    ("content", "offset"),
    [
        (b"a" * 5000 + b"\xff" + b"b" * 10, "5,000"),
        (b"a" * 1023 + "€".encode()[:2] + b"X", "1,023"),  # a character split across two blocks, then broken
        (b"abc" + "€".encode()[:2], "3"),  # a file cut off mid-character
    ],
)
def test_undecodable_bytes_are_located(tmp_path, content, offset):
    (tmp_path / "bad.txt").write_bytes(content)
    with pytest.raises(
        GptforgeError, match=rf"bad.txt: invalid UTF-8 at byte {offset}; fix the file or pass --errors="
    ):
        list(read_text(tmp_path / "bad.txt", chunk_bytes=1024))
    replaced = "".join(read_text(tmp_path / "bad.txt", "replace", chunk_bytes=1024))
    assert replaced == content.decode("utf-8", "replace")


def test_an_input_file_whose_name_has_a_comma_is_taken_whole(tmp_path):
    from gptforge.data.corpus import expand_inputs

    odd = tmp_path / "Romeo, Juliet.txt"
    odd.write_text("O Romeo", encoding="utf-8")
    other = tmp_path / "b.txt"
    other.write_text("b", encoding="utf-8")
    assert expand_inputs(str(odd)) == [odd]
    assert expand_inputs(f"{other},{tmp_path / 'b.txt'}") == [other]  # lists still split, duplicates once
