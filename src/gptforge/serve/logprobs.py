"""Logprobs as OpenAI writes them: the engine's (token id, logprob, likeliest alternatives) entries turned
into a completion's `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}` and a chat completion's
`{"content": [{"token", "logprob", "bytes", "top_logprobs"}]}`.

A token is shown as its text when the tokenizer decodes it alone, and its bytes are UTF-8 text; a token that
is part of a character (GPT-2 splits an emoji into byte pieces) is shown as OpenAI shows it,
`bytes:\\xf0\\x9f` (a backslash, an x and two hex digits per byte), and a chat's `bytes` always has the raw
bytes. A chat template's markers are their text (`<|end|>`). The numbers are the engine's; the shapes and
the token strings are this module's. The fields around them are api.py's.
"""

from collections.abc import Iterable
from typing import Any

from gptforge.serve.engine import TokenLogprob
from gptforge.tokenizer import Tokenizer


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The bytes `token` stands for; b"" for an id the tokenizer does not have (a padded vocabulary's)."""
    try:
        return tokenizer.token_bytes(token)
    except Exception:  # an id out of the tokenizer's range, whatever its tokenizer raises for it
        return b""


def token_text(raw: bytes) -> str:
    """A token as logprobs show it: its text, or `bytes:\\xe2\\x80` when its bytes are no UTF-8 text alone."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


class TokenStrings:
    """Each token's bytes and text, cached: a vocabulary's worth at most."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.cache: dict[int, tuple[bytes, str]] = {}

    def __call__(self, token: int) -> tuple[bytes, str]:
        if token not in self.cache:
            raw = token_bytes(self.tokenizer, token)
            self.cache[token] = raw, token_text(raw)
        return self.cache[token]


class Offsets:
    """Where each token starts in a text, in characters, fed the tokens' bytes in order: the index of the
    character its first byte belongs to (a token that ends a character split across tokens starts at that
    character). Bytes that are no UTF-8 count one character each, as the decoder's U+FFFD."""

    def __init__(self, start: int = 0):
        self.chars = start  # characters complete so far
        self.missing = 0  # continuation bytes the character being read still needs

    def take(self, raw: bytes) -> int:
        offset = None
        for b in raw:
            if 0x80 <= b < 0xC0 and self.missing:  # a continuation byte of the character being read
                offset = self.chars if offset is None else offset
                self.missing -= 1
                self.chars += self.missing == 0
                continue
            if self.missing:  # a character cut short is one U+FFFD, before this byte's
                self.chars, self.missing = self.chars + 1, 0
            offset = self.chars if offset is None else offset
            if b < 0xC0:  # ASCII, or a stray continuation byte (one U+FFFD)
                self.chars += 1
            else:
                self.missing = 1 if b < 0xE0 else 2 if b < 0xF0 else 3
        return self.chars if offset is None else offset


class CompletionLogprobs:
    """A completion choice's `logprobs`, built part by part: a whole completion is one part, a stream's
    chunks are one each. With echo the prompt's tokens come first, at offsets from 0; the completion's
    offsets count from the start of its text in the choice (the prompt's length with echo)."""

    def __init__(self, strings: TokenStrings):
        self.strings = strings
        self.offsets = Offsets()

    def part(self, entries: Iterable[TokenLogprob], limit: int, restart: int | None = None) -> dict[str, Any]:
        """The part for `entries`, their offsets at most `limit` (the text's length: tokens cut off by a stop
        string, and a stop token, have none of it); `restart` the offsets there first."""
        if restart is not None:
            self.offsets = Offsets(restart)
        part: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for entry in entries:
            raw, text = self.strings(entry.token)
            part["tokens"].append(text)
            part["token_logprobs"].append(entry.logprob)
            part["top_logprobs"].append(
                None if entry.top is None else {self.strings(t)[1]: logprob for t, logprob in entry.top})
            part["text_offset"].append(min(self.offsets.take(raw), limit))
        return part


def joined(*parts: dict[str, Any]) -> dict[str, Any]:
    """Parts of one choice's logprobs as one."""
    return {key: [value for part in parts for value in part[key]] for key in parts[0]}


def chat_logprobs(strings: TokenStrings, entries: Iterable[TokenLogprob]) -> dict[str, Any]:
    """A chat choice's (or a chunk's) `logprobs`: {"content": [...], "refusal": None}."""

    def token(t: int, logprob: float | None) -> dict[str, Any]:
        raw, text = strings(t)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    content = [{**token(e.token, e.logprob), "top_logprobs": [token(t, lp) for t, lp in e.top or ()]}
               for e in entries]
    return {"content": content, "refusal": None}
