"""Tokenizers: text to token ids and back.

- `char`: one id per character of a fixed vocabulary (nanoGPT's shakespeare_char: the sorted distinct
  characters).
- `gpt2`: OpenAI's GPT-2 BPE through tiktoken (`<|endoftext|>` = 50256), built from the mirror's
  `encoder.json` and `vocab.bpe` when a mirror has them, else from tiktoken's own download.
- `bpe`: a byte-level BPE trained on the user's corpus with HF `tokenizers`, saved as `tokenizer.json`.

A tokenizer describes itself as a JSON-able `spec()` and `from_spec` rebuilds it; that is how meta.json stores
it. Beside them, what every command that talks to a model needs from the text side: a prompt's ids
(`encode_prompt`), the check that ids fit a model's vocabulary (`check_token_ids`) and generated ids back into
complete text (`TextStream`). This module knows nothing about token files, splits or models beyond a
vocabulary's size.
"""

import functools
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import tiktoken
import tiktoken.load
import tokenizers
from tiktoken_ext.openai_public import r50k_pat_str

from gptforge.atomic import atomic_write_text
from gptforge.errors import GptforgeError
from gptforge.mirror import HOW_TO_MIRROR, Remote, in_mirror, mirror_dir

EOT = "<|endoftext|>"
REPLACEMENT = "\ufffd"  # what decoding gives for the bytes of a character that is not complete yet
GPT2_ENCODER_JSON = Remote(
    url="https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    mirror_path="gpt2/encoder.json",
    sha256="196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
)
GPT2_VOCAB_BPE = Remote(
    url="https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    mirror_path="gpt2/vocab.bpe",
    sha256="1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
)


class Tokenizer(ABC):
    """Text to ids and back; `eot_token` is the end-of-text id, or None for tokenizers without one."""

    kind: ClassVar[str]
    vocab_size: int
    eot_token: int | None

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of `text`; special-token text such as `<|endoftext|>` is encoded as ordinary text."""

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """`encode` as a uint32 array: the fast path `prepare` uses."""
        return np.asarray(self.encode(text), dtype=np.uint32)

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`; `decode(encode(s)) == s` for every string `s` the tokenizer can encode."""

    @abstractmethod
    def spec(self) -> dict[str, Any]:
        """What meta.json records so that `from_spec` can rebuild this tokenizer."""

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for (a BPE token may be part of a character): what logprobs show."""
        return self.decode([token]).encode()


class CharTokenizer(Tokenizer):
    """One id per character: id i is `chars[i]`."""

    kind = "char"
    eot_token = None

    def __init__(self, chars: str):
        if len(set(chars)) != len(chars) or not chars:
            raise GptforgeError("a char vocabulary must be a non-empty string of distinct characters")
        self.chars = chars
        self.vocab_size = len(chars)
        codes = _codepoints(chars)
        # A lookup table from code point to id (-1: not in the vocabulary) encodes a whole text in one
        # numpy gather.
        self._ids = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        self._ids[codes] = np.arange(len(chars))

    @classmethod
    def from_text(cls, texts: Iterable[str]) -> "CharTokenizer":
        """The vocabulary of a corpus given in pieces: its sorted distinct characters,
        as nanoGPT builds it."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls("".join(sorted(seen)))

    def encode_to_numpy(self, text: str) -> np.ndarray:
        codes = _codepoints(text)
        ids = np.full(len(codes), -1, dtype=np.int64)
        known = codes < len(self._ids)
        ids[known] = self._ids[codes[known]]
        if len(ids) and ids.min() < 0:
            position = int(np.argmax(ids < 0))
            char = text[position]
            raise GptforgeError(
                f"character {char!r} (U+{ord(char):04X}) at position {position} is not in this char "
                f"tokenizer's {self.vocab_size}-character vocabulary; remove it, or prepare the dataset "
                "from text that has it"
            )
        return ids.astype(np.uint32)

    def encode(self, text: str) -> list[int]:
        return self.encode_to_numpy(text).tolist()

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise GptforgeError(f"token ids must be in [0, {self.vocab_size}) for this char tokenizer")
        return "".join(self.chars[i] for i in ids)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "chars": self.chars}


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


class GPT2Tokenizer(Tokenizer):
    """OpenAI's GPT-2 BPE (tiktoken's `gpt2` encoding); `encode` is `encode_ordinary`, as nanoGPT uses it."""

    kind = "gpt2"
    vocab_size = 50257
    eot_token = 50256

    def __init__(self, mirror: Path | None = None):
        """Use `mirror` (default: $GPTFORGE_DATA_MIRROR) for the BPE files when it has them."""
        self.mirror = mirror if mirror is not None else mirror_dir()
        self._encoding = gpt2_encoding(self.mirror)

    def encode(self, text: str) -> list[int]:
        return self._encoding.encode_ordinary(text)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        # No special tokens allowed and none disallowed: the same ids as encode_ordinary, without a
        # Python list.
        return self._encoding.encode_to_numpy(text, disallowed_special=())

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode([int(i) for i in ids])

    def token_bytes(self, token: int) -> bytes:
        return self._encoding.decode_single_token_bytes(token)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "encoding": "gpt2",
            "files": {
                GPT2_ENCODER_JSON.url: GPT2_ENCODER_JSON.sha256,
                GPT2_VOCAB_BPE.url: GPT2_VOCAB_BPE.sha256,
            },
        }


@functools.cache
def gpt2_encoding(mirror: Path | None) -> tiktoken.Encoding:
    """tiktoken's GPT-2 encoding from the mirror's encoder.json + vocab.bpe,
    else tiktoken's download (and cache)."""
    encoder_json, vocab_bpe = in_mirror(GPT2_ENCODER_JSON, mirror), in_mirror(GPT2_VOCAB_BPE, mirror)
    if encoder_json is None or vocab_bpe is None:
        try:
            return tiktoken.get_encoding("gpt2")
        except (OSError, ValueError) as e:  # requests' errors are OSErrors; a bad download is a ValueError
            raise GptforgeError(
                f"cannot get the GPT-2 BPE files ({GPT2_ENCODER_JSON.url} and vocab.bpe beside it): "
                f"{type(e).__name__}; offline? {HOW_TO_MIRROR} with gpt2/encoder.json and gpt2/vocab.bpe "
                "inside it"
            ) from e
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe), encoder_json_file=str(encoder_json)
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={EOT: 50256},
        explicit_n_vocab=50257,
    )


class BPETokenizer(Tokenizer):
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) trained on a corpus with HF `tokenizers`."""

    kind = "bpe"
    FILE = "tokenizer.json"

    def __init__(self, hf: tokenizers.Tokenizer):
        # `<|endoftext|>` in a text stays ordinary text, as with gpt2's encode_ordinary; only prepare adds
        # the id.
        hf.encode_special_tokens = True
        self.hf = hf
        self.vocab_size = hf.get_vocab_size()
        self.eot_token = hf.token_to_id(EOT)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        """Learn `vocab_size` tokens (the 256 bytes, `<|endoftext|>` = 0, then merges) from `texts`."""
        if vocab_size < 257:
            raise GptforgeError(
                f"--vocab_size={vocab_size} is too small for a byte-level BPE: use 257 or more"
            )
        hf = tokenizers.Tokenizer(tokenizers.models.BPE())
        hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: Path, sha256: str | None = None) -> "BPETokenizer":
        """Reload a saved tokenizer; with `sha256`, check it is the file meta.json was written with."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise GptforgeError(f"{path} is missing; re-run `gptforge prepare` for this dataset") from None
        if sha256 is not None and _sha256(text) != sha256:
            raise GptforgeError(
                f"{path} is not the tokenizer this dataset was prepared with; re-run `gptforge prepare`"
            )
        return cls(tokenizers.Tokenizer.from_str(text))

    def to_json(self) -> str:
        return self.hf.to_str()

    def save(self, path: Path) -> None:
        atomic_write_text(path, self.to_json())

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "file": self.FILE, "sha256": _sha256(self.to_json())}

    def token_bytes(self, token: int) -> bytes:
        piece = self.hf.id_to_token(token)
        if piece is None:
            raise GptforgeError(f"token {token} is not in this {self.vocab_size}-token BPE")
        alphabet = byte_level_alphabet()
        # a special token (<|endoftext|>) is stored as its text, not in the byte alphabet
        return bytes(alphabet[c] for c in piece) if all(c in alphabet for c in piece) else piece.encode()


@functools.cache
def byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet, character to byte: the printable bytes stand for themselves, the
    others for the characters from U+0100 on (`bytes_to_unicode` in GPT-2's encoder.py), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    pairs = [(chr(b), b) for b in printable] + [(chr(256 + i), b) for i, b in enumerate(others)]
    return dict(pairs)


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


KINDS = ("char", "gpt2", "bpe")


def from_spec(spec: dict[str, Any], directory: Path, mirror: Path | None = None) -> Tokenizer:
    """Rebuild the tokenizer meta.json describes; `directory` holds its files (a bpe's tokenizer.json)."""
    kind = spec.get("kind")
    if kind == "char":
        return CharTokenizer(spec["chars"])
    if kind == "gpt2":
        return GPT2Tokenizer(mirror)
    if kind == "bpe" and "json" in spec:  # a self-contained spec (`portable_spec`)
        return BPETokenizer(tokenizers.Tokenizer.from_str(spec["json"]))
    if kind == "bpe":
        return BPETokenizer.load(directory / spec["file"], spec.get("sha256"))
    raise GptforgeError(
        f"unknown tokenizer kind {kind!r} in {directory}/meta.json; known: {', '.join(KINDS)}"
    )


def portable_spec(tokenizer: Tokenizer) -> dict[str, Any]:
    """`spec()` that needs no file beside it: a trained BPE's carries its tokenizer.json's text. What a run
    stores when its tokens come from no prepared dataset (finetuning on conversations)."""
    spec = tokenizer.spec()
    return {**spec, "json": tokenizer.to_json()} if isinstance(tokenizer, BPETokenizer) else spec


def encode_prompt(tokenizer: Tokenizer, text: str, what: str = "the prompt") -> list[int]:
    """The ids of a prompt; an empty prompt starts from end-of-text, as GPT-2 was trained to begin a document.
    A tokenizer without end-of-text cannot start from nothing: an error naming `what` says so."""
    ids = tokenizer.encode(text)
    if ids:
        return ids
    if tokenizer.eot_token is None:
        raise GptforgeError(f"{what} is empty and this tokenizer has no end-of-text token; give a prompt")
    return [tokenizer.eot_token]


def check_token_ids(max_id: int, vocab_size: int, what: str) -> None:
    """`what` (a prompt, a dataset) holds ids up to `max_id`:
    all must be rows of a `vocab_size`-token model."""
    if max_id >= vocab_size:
        raise GptforgeError(
            f"{what} has token ids the {vocab_size}-token model does not know (up to {max_id}, the model's "
            f"last is {vocab_size - 1})"
        )


class TextStream:
    """Token ids in, finished text out: tokens whose text ends in an incomplete character
    wait for the rest."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        """The text completed by `token`, possibly empty."""
        self.pending.append(token)
        text = self.tokenizer.decode(self.pending)
        if text.endswith(REPLACEMENT):
            return ""
        self.pending.clear()
        return text

    def flush(self) -> str:
        """Whatever is still held, as it decodes (at the end of a sample)."""
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending.clear()
        return text
