"""The token-file format: what `gptforge prepare` writes and everything after it reads.

A prepared dataset is a directory with `train.bin` and `val.bin` (one flat stream of little-endian uint16
token ids, uint32 when the vocabulary needs it: the files nanoGPT reads with `np.memmap`) and `meta.json`,
written last by `gptforge prepare`: tokenizer, vocab size, dtype, token counts, source. This module owns that
format: it writes and checks meta.json, reads nanoGPT's char meta.pkl, and maps a split's tokens. It imports
nothing else of the data package: where the text came from is corpus.py's business, how batches are drawn
batches.py's, and what the ids mean tokenizer.py's.
"""

import contextlib
import dataclasses
import json
import mmap
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from gptforge import __version__
from gptforge.atomic import atomic_write_text
from gptforge.errors import GptforgeError
from gptforge.tokenizer import CharTokenizer, Tokenizer, from_spec

SPLITS = ("train", "val")
META_FILE = "meta.json"
TOKEN_DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int, requested: str = "auto") -> str:
    """uint16 (nanoGPT's format) unless the vocabulary exceeds 65,535 ids, then uint32; a too-small choice is
    an error."""
    needed = "uint16" if vocab_size <= 65535 else "uint32"
    if requested == "auto":
        return needed
    if requested not in TOKEN_DTYPES:
        raise GptforgeError(f"dtype {requested!r} is not one of auto, {', '.join(TOKEN_DTYPES)}")
    if np.iinfo(requested).max < vocab_size - 1:
        raise GptforgeError(
            f"vocab_size {vocab_size} does not fit {requested}; use --dtype={needed} or --dtype=auto"
        )
    return requested


@dataclasses.dataclass(frozen=True)
class Meta:
    """The contents of meta.json: everything needed to read the .bin files and rebuild their tokenizer."""

    tokenizer: dict[str, Any]
    vocab_size: int
    dtype: str
    tokens: dict[str, int]
    eot_token: int | None = None
    dataset: str = ""
    source: dict[str, Any] = dataclasses.field(default_factory=dict)
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    gptforge_version: str = __version__

    def write(self, directory: Path) -> None:
        atomic_write_text(Path(directory) / META_FILE, json.dumps(dataclasses.asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, directory: str | Path) -> "Meta":
        """Read and check a dataset directory: meta.json (or a nanoGPT char meta.pkl) and the sizes of its
        .bin files."""
        directory = Path(directory)
        if (directory / META_FILE).is_file():
            meta = cls._from_json(directory / META_FILE)
        elif (directory / "meta.pkl").is_file():
            meta = _from_nanogpt_pkl(directory)
        elif not directory.is_dir():
            raise GptforgeError(
                f"no dataset at {directory}; "
                f"create it with `gptforge prepare NAME --data_dir={directory.parent}`"
            )
        else:
            raise GptforgeError(
                f"{directory / META_FILE} is missing, so {directory} is incomplete "
                f"(an interrupted prepare?); "
                f"re-run `gptforge prepare` for it"
            )
        meta._check_files(directory)
        return meta

    @classmethod
    def _from_json(cls, path: Path) -> "Meta":
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            meta = cls(**raw)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as e:
            raise GptforgeError(
                f"{path} is not a gptforge meta.json ({e}); re-run `gptforge prepare`"
            ) from None
        if meta.dtype not in TOKEN_DTYPES:
            raise GptforgeError(f"{path}: dtype {meta.dtype!r} is not one of {', '.join(TOKEN_DTYPES)}")
        if np.iinfo(meta.dtype).max < meta.vocab_size - 1:
            raise GptforgeError(f"{path}: vocab_size {meta.vocab_size} does not fit its dtype {meta.dtype}")
        return meta

    def _check_files(self, directory: Path) -> None:
        itemsize = np.dtype(self.dtype).itemsize
        for split, count in self.tokens.items():
            path = directory / f"{split}.bin"
            size = path.stat().st_size if path.is_file() else None
            if size != count * itemsize:
                found = "is missing" if size is None else f"has {size:,} bytes"
                raise GptforgeError(
                    f"{path} {found} but meta.json says {count:,} {self.dtype} tokens "
                    f"({count * itemsize:,} bytes); "
                    f"the dataset is incomplete or was changed: re-run `gptforge prepare`"
                )

    def load_tokenizer(self, directory: str | Path, mirror: Path | None = None) -> Tokenizer:
        """The tokenizer these tokens were made with (files it needs live in `directory`)."""
        return from_spec(self.tokenizer, Path(directory), mirror)


class _NoGlobals(pickle.Unpickler):
    """Unpickles plain data only: no class or function can be named, so no code can run."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _from_nanogpt_pkl(directory: Path) -> Meta:
    """A nanoGPT char dataset: meta.pkl holds {vocab_size, itos, stoi} and the .bin files are uint16."""
    path = directory / "meta.pkl"
    try:
        with open(path, "rb") as f:
            raw = _NoGlobals(f).load()
        vocab_size, itos = raw["vocab_size"], raw["itos"]
        chars = "".join(itos[i] for i in range(vocab_size))
        ok = len(chars) == vocab_size and raw["stoi"] == {c: i for i, c in enumerate(chars)}
    except (pickle.UnpicklingError, EOFError, TypeError, KeyError, ValueError, AttributeError) as e:
        raise GptforgeError(f"{path} is not nanoGPT's {{vocab_size, itos, stoi}} meta.pkl ({e})") from None
    if not ok:
        raise GptforgeError(f"{path}: itos and stoi disagree; re-create it with `gptforge prepare`")
    sizes = {
        s: (directory / f"{s}.bin").stat().st_size // 2 for s in SPLITS if (directory / f"{s}.bin").is_file()
    }
    return Meta(
        tokenizer=CharTokenizer(chars).spec(),
        vocab_size=vocab_size,
        dtype="uint16",
        tokens=sizes,
        dataset=directory.name,
        source={"nanogpt_meta_pkl": str(path)},
    )


class TokenDataset:
    """One split's tokens, memory-mapped once for the life of the object."""

    def __init__(self, directory: str | Path, split: str = "train", meta: Meta | None = None):
        self.directory = Path(directory)
        self.meta = meta or Meta.read(self.directory)
        self.split = split
        if split not in self.meta.tokens:
            raise GptforgeError(
                f"{self.directory} has no {split!r} split; it has {', '.join(self.meta.tokens)}"
            )
        if self.meta.tokens[split] == 0:
            raise GptforgeError(
                f"{self.directory}/{split}.bin is empty; re-run `gptforge prepare` with more text"
            )
        with open(self.directory / f"{split}.bin", "rb") as f:
            self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.tokens = np.frombuffer(self._mmap, dtype=np.dtype(self.meta.dtype).newbyteorder("<"))

    def __len__(self) -> int:
        return len(self.tokens)

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The rows `tokens[s : s + length]` for each start, copied out of the mapping."""
        rows = self.tokens[np.asarray(starts, dtype=np.int64)[:, None] + np.arange(length)]
        # Pages a mapping has touched stay in the process's resident memory, which is why nanoGPT re-opens its
        # memmap every batch. Dropping them keeps one long-lived mapping flat; the OS page cache still holds
        # them.
        if hasattr(self._mmap, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)
        return rows

    def close(self) -> None:
        del self.tokens
        # If a caller still holds a view of `tokens`, the mapping goes when the last view does.
        with contextlib.suppress(BufferError):
            self._mmap.close()

    def __enter__(self) -> "TokenDataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
