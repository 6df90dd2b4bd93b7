"""Tests for how `gptforge serve` shows logprobs (gptforge.serve.logprobs): each tokenizer's tokens as bytes
(char, trained BPE, a chat template's markers; GPT-2's are checked against tiktoken in
test_serve_openai.py), token strings with OpenAI's `bytes:\\xNN` for pieces of characters, text offsets
across split characters and bytes that are no UTF-8, and the completion and chat shapes.

    .venv/bin/python -m pytest tests/test_serve_logprobs.py
"""

import tokenizers

from gptforge.chat_template import ChatTemplate, ChatTokenizer
from gptforge.serve.engine import TokenLogprob
from gptforge.serve.logprobs import (
    CompletionLogprobs,
    Offsets,
    TokenStrings,
    chat_logprobs,
    joined,
    token_bytes,
    token_text,
)
from gptforge.tokenizer import BPETokenizer, CharTokenizer, byte_level_alphabet

TEXT = "naïve café, \U0001f600 and \u2764 again and again"


def test_the_byte_level_alphabet_is_hfs():
    alphabet = byte_level_alphabet()
    assert sorted(alphabet.values()) == list(range(256))
    assert set(alphabet) == set(tokenizers.pre_tokenizers.ByteLevel.alphabet())
    assert alphabet["Ġ"] == ord(" ") and alphabet["a"] == ord("a")


def test_every_tokenizers_tokens_are_their_bytes():
    bpe = BPETokenizer.train([TEXT * 3], vocab_size=300)
    char = CharTokenizer("".join(sorted(set(TEXT))))
    for tokenizer in (bpe, char):
        ids = tokenizer.encode(TEXT)
        assert b"".join(token_bytes(tokenizer, t) for t in ids) == TEXT.encode()
    assert token_bytes(bpe, bpe.eot_token) == b"<|endoftext|>"
    assert token_bytes(bpe, 10_000) == token_bytes(char, 10_000) == b""  # no such id: nothing, no error
    chat = ChatTokenizer(char, ChatTemplate.for_tokenizer(char))
    assert token_bytes(chat, chat.template.end) == b"<|end|>"
    assert token_bytes(chat, char.encode("é")[0]) == "é".encode()


def test_token_strings_are_text_or_openais_bytes():
    assert token_text(" caf\u00e9".encode()) == " café"
    assert token_text(b"\xf0\x9f") == "bytes:\\xf0\\x9f"
    assert token_text(b" \xe2") == "bytes:\\x20\\xe2"
    assert token_text(b"") == ""


def offsets(pieces: list[bytes], start: int = 0) -> list[int]:
    counter = Offsets(start)
    return [counter.take(piece) for piece in pieces]


def test_offsets_count_characters_and_split_ones_start_where_they_begin():
    assert offsets([b"ab", b" c", b"d"]) == [0, 2, 4]
    assert offsets([b"ab", b"cd"], start=7) == [7, 9]
    # an emoji in three pieces: each starts at the emoji, the next token after it
    assert offsets([b"I \xf0\x9f", b"\x98", b"\x80", b"!"]) == [0, 2, 2, 3]
    # a character cut short (then text) is one U+FFFD before the text, as the decoder writes it
    text = b"\xd0\xbe\xd0" + b" tre"
    assert text.decode("utf-8", errors="replace") == "о\ufffd tre"
    assert offsets([b"\xd0\xbe\xd0", b" tre", b"x"]) == [0, 2, 6]
    assert offsets([b"\x80", b"a"]) == [0, 1]  # a stray continuation byte: one U+FFFD
    assert offsets([b"", b"a", b""]) == [0, 0, 1]  # a token of no bytes starts where the text is


def test_the_shapes():
    char = CharTokenizer("abc\u00e9")
    strings = TokenStrings(char)
    prompt = [TokenLogprob(0, None, None), TokenLogprob(1, -0.5, ((1, -0.5), (3, -1.0)))]
    drawn = [TokenLogprob(3, -2.0, ((0, -0.1), (3, -2.0))), TokenLogprob(2, -0.25, ())]
    built = CompletionLogprobs(strings)
    echo = built.part(prompt, limit=2)
    rest = built.part(drawn, limit=3, restart=2)
    assert joined(echo, rest) == {
        "tokens": ["a", "b", "é", "c"], "token_logprobs": [None, -0.5, -2.0, -0.25],
        "top_logprobs": [None, {"b": -0.5, "é": -1.0}, {"a": -0.1, "é": -2.0}, {}],
        "text_offset": [0, 1, 2, 3],
    }
    assert chat_logprobs(strings, drawn[:1]) == {"content": [
        {"token": "é", "logprob": -2.0, "bytes": [0xC3, 0xA9], "top_logprobs": [
            {"token": "a", "logprob": -0.1, "bytes": [97]},
            {"token": "é", "logprob": -2.0, "bytes": [0xC3, 0xA9]},
        ]},
    ], "refusal": None}
