"""The token-file format: what `gptforge prepare` writes and everything after it reads.

A prepared dataset is a directory with `train.bin` and `val.bin` (one flat stream of little-endian uint16
token ids, uint32 when the vocabulary needs it: the files nanoGPT reads with `np.memmap`) and `meta.json`,
written last by `gptforge prepare`: tokenizer, vocab size, dtype, token counts, source. A split may instead be
a list of shards that meta.json names; and a directory (or glob) of llm.c / modded-nanogpt token shards (a
256 x int32 header, then uint16 GPT-2 tokens) reads as a dataset as it is. This module owns those formats: it
writes and checks meta.json, reads nanoGPT's char meta.pkl and llm.c's headers, and maps a split's shards
lazily. It imports nothing else of the data package: where the text came from is corpus.py's business, how
batches are drawn batches.py's, and what the ids mean tokenizer.py's.
"""

import collections
import contextlib
import dataclasses
import glob
import json
import mmap
import os
import pickle
import re
import threading
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
# llm.c's token shards (dev/data/data_common.py, also modded-nanogpt's): 256 little-endian int32s (magic,
# version, token count, zeros), then the tokens; version 1 is GPT-2's uint16 ids
LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_BYTES = 20240520, 1, 256 * 4
LLMC_LLAMA3_MAGIC = 20240801


@dataclasses.dataclass(frozen=True)
class Shard:
    """One file of a split: its path relative to the dataset directory, its token count, and the bytes before
    its first token (0 for gptforge's files, llm.c's header for its shards)."""

    file: str
    tokens: int
    offset: int = 0


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
    # A split of many files: {split: [{"file": "train_000000.bin", "tokens": N, "sha256": HEX}, ...]}, in
    # order; an entry may add "offset": the bytes before its first token (1024 for an llm.c shard). A split
    # not listed here is the one file `{split}.bin` (nanoGPT's shape).
    shards: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    gptforge_version: str = __version__

    def shards_of(self, split: str) -> list[Shard]:
        """`split`'s files, in order: one `{split}.bin` unless meta.json lists shards."""
        if split in self.shards:
            return [Shard(s["file"], int(s["tokens"]), int(s.get("offset", 0))) for s in self.shards[split]]
        return [Shard(f"{split}.bin", self.tokens[split])]

    def shard_files(self, split: str) -> list[tuple[str, int]]:
        """(file name, token count) of each of `split`'s files, in order."""
        return [(shard.file, shard.tokens) for shard in self.shards_of(split)]

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
        elif directory.is_dir() and any(is_llmc_shard(path) for path in sorted(directory.glob("*.bin"))):
            return llmc_meta(directory, sorted(directory.glob("*.bin")))
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
        for split in self.tokens:
            for shard in self.shards_of(split):
                path = directory / shard.file
                size = path.stat().st_size if path.is_file() else None
                expected = shard.offset + shard.tokens * itemsize
                if size != expected:
                    found = "is missing" if size is None else f"has {size:,} bytes"
                    header = f" after a {shard.offset:,}-byte header" if shard.offset else ""
                    raise GptforgeError(
                        f"{path} {found} but meta.json says {shard.tokens:,} {self.dtype} tokens{header} "
                        f"({expected:,} bytes); "
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


# ---- llm.c's token shards


def is_llmc_shard(path: Path) -> bool:
    """Whether `path` starts with llm.c's magic number (any version)."""
    with open(path, "rb") as f:
        magic = np.frombuffer(f.read(4), "<i4")
    return len(magic) == 1 and int(magic[0]) in (LLMC_MAGIC, LLMC_LLAMA3_MAGIC)


def llmc_tokens(path: Path) -> int:
    """The token count in an llm.c shard's header, checked against the file's size (reads the header only)."""
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(12), "<i4")
    if len(header) < 3 or int(header[0]) not in (LLMC_MAGIC, LLMC_LLAMA3_MAGIC):
        raise GptforgeError(f"{path} is not an llm.c token shard (no magic {LLMC_MAGIC} in its header)")
    magic, version, count = (int(v) for v in header)
    if magic != LLMC_MAGIC or version != LLMC_VERSION:
        raise GptforgeError(
            f"{path} is an llm.c shard of magic {magic}, version {version} (Llama 3's uint32 tokens?); "
            f"gptforge reads GPT-2's (magic {LLMC_MAGIC}, version {LLMC_VERSION})"
        )
    size, expected = path.stat().st_size, LLMC_HEADER_BYTES + 2 * count
    if size != expected:
        raise GptforgeError(
            f"{path} has {size:,} bytes but its header says {count:,} tokens ({expected:,} bytes); "
            "the shard is truncated or was changed: download or write it again"
        )
    return count


_SPLIT_IN_NAME = re.compile(r"(?:^|[_.-])(train|val)(?:[_.-]|$)")


def llmc_meta(directory: Path, files: list[Path]) -> Meta:
    """A dataset of llm.c shards (GPT-2 tokens): each file's split is the `train` or `val` in its name
    (llm.c's `fineweb_train_000001.bin`, `fineweb_val_000000.bin`, `tiny_shakespeare_val.bin`), its shards in
    name order. Only the headers are read."""
    shards: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(set(files)):
        split = _SPLIT_IN_NAME.search(path.stem)
        if split is not None:
            shards.setdefault(split.group(1), []).append(
                {"file": os.path.relpath(path, directory), "tokens": llmc_tokens(path),
                 "offset": LLMC_HEADER_BYTES}
            )
    missing = [split for split in SPLITS if split not in shards]
    if missing:
        raise GptforgeError(
            f"{directory} has no llm.c {' or '.join(missing)} shards (files named like "
            f"fineweb_{missing[0]}_000000.bin)"
        )
    return Meta(
        tokenizer={"kind": "gpt2"}, vocab_size=50257, dtype="uint16", eot_token=50256,
        tokens={split: sum(s["tokens"] for s in files) for split, files in shards.items()},
        dataset=directory.name, source={"llmc_shards": str(directory)}, shards=shards,
    )


def locate(data_dir: str | Path, name: str | Path) -> tuple[Path, Meta]:
    """The dataset `--dataset=NAME` names, read and checked: DATA_DIR/NAME, else the path NAME; or a glob of
    llm.c shards, whose other split is the same glob with `train` and `val` swapped in its file name. Returns
    the directory its files are relative to, and its Meta."""
    name = str(name)
    if glob.has_magic(name):
        head, tail = os.path.split(name)
        swapped = re.sub(r"train|val", lambda m: {"train": "val", "val": "train"}[m[0]], tail)
        other = os.path.join(head, swapped)
        files = [Path(f) for pattern in (name, other) for f in glob.glob(pattern, recursive=True)]
        if not files:
            raise GptforgeError(f"--dataset={name} matches no files")
        directory = Path(os.path.commonpath([f.parent for f in files]))
        return directory, llmc_meta(directory, files)
    under = Path(data_dir) / name
    directory = Path(name) if not under.exists() and Path(name).exists() else under
    return directory, Meta.read(directory)


# ---- reading a split


class TokenDataset:
    """One split's tokens: a list of shards (one `{split}.bin`, or the files meta.json lists), seen as one
    stream of `len(self)` tokens where shard i holds positions `[offsets[i], offsets[i + 1])`.

    Opening costs nothing per token: a shard is memory-mapped when a window first needs it, and at most
    `max_open` mappings stay open (least recently used closed first), so a split of thousands of shards opens
    as fast as one. `maps_opened` counts the mappings made.
    """

    def __init__(self, directory: str | Path, split: str = "train", meta: Meta | None = None,
                 max_open: int = 1024):
        self.directory = Path(directory)
        self.meta = meta or Meta.read(self.directory)
        self.split = split
        if split not in self.meta.tokens:
            raise GptforgeError(
                f"{self.directory} has no {split!r} split; it has {', '.join(self.meta.tokens)}"
            )
        self.shards = self.meta.shards_of(split)
        if self.meta.tokens[split] == 0:
            what = self.shards[0].file if len(self.shards) == 1 else f"the {split} split"
            raise GptforgeError(
                f"{self.directory}/{what} is empty; re-run `gptforge prepare` with more text"
            )
        self.lengths = np.array([shard.tokens for shard in self.shards], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self._paths = [os.fspath(self.directory / shard.file) for shard in self.shards]
        self.dtype = np.dtype(self.meta.dtype).newbyteorder("<")
        self.max_open = max_open
        self.maps_opened = 0
        self._open: collections.OrderedDict[int, tuple[mmap.mmap, np.ndarray]] = collections.OrderedDict()
        self._eot_positions: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # a prefetch thread and the eval share a split

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def tokens(self) -> np.ndarray:
        """The whole split as one array: the mapping itself for one shard, a copy of all of them for many
        (for a val split; training reads windows)."""
        with self._lock:
            if len(self.shards) == 1:
                return self._shard(0)
            return np.concatenate([self._shard(i) for i in range(len(self.shards))])

    def windows(self, starts: np.ndarray, length: int) -> np.ndarray:
        """The rows `tokens[s : s + length]` for each start, copied out of the mappings; a window lies in one
        shard."""
        starts = np.asarray(starts, dtype=np.int64)
        which = np.searchsorted(self.offsets, starts, side="right") - 1
        rows = np.empty((len(starts), length), dtype=self.dtype)
        order = np.argsort(which, kind="stable")  # the rows grouped by shard
        shards, firsts = np.unique(which[order], return_index=True)
        with self._lock:
            for i, here in zip(shards.tolist(), np.split(order, firsts[1:]), strict=True):
                local = starts[here] - self.offsets[i]
                if local.min() < 0 or local.max() + length > self.lengths[i]:
                    raise GptforgeError(
                        f"a window of {length} tokens crosses the end of {self.shards[i].file}"
                    )
                rows[here] = self._shard(i)[local[:, None] + np.arange(length)]
                # Pages a mapping has touched stay in the process's resident memory, which is why nanoGPT
                # re-opens its memmap every batch. Dropping them keeps long-lived mappings flat; the OS page
                # cache still holds them.
                mapping = self._open[i][0]
                if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                    mapping.madvise(mmap.MADV_DONTNEED)
        return rows

    def eot_positions(self, i: int) -> np.ndarray:
        """The positions (within shard `i`) of its end-of-text tokens, found in one pass on first use and
        kept (8 bytes per document)."""
        eot = self.meta.eot_token
        if eot is None:
            kind = self.meta.tokenizer.get("kind")
            raise GptforgeError(
                f"{self.directory} has no end-of-text token (its tokenizer is {kind}), so no documents to "
                "align rows to; use --align_rows=none"
            )
        with self._lock:
            if i not in self._eot_positions:
                tokens, step, found = self._shard(i), 1 << 24, []
                for begin in range(0, len(tokens), step):  # in pieces: no bool array the size of the shard
                    found.append(begin + np.flatnonzero(tokens[begin:begin + step] == eot))
                self._eot_positions[i] = np.concatenate(found) if found else np.empty(0, dtype=np.int64)
                mapping = self._open[i][0]
                if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                    mapping.madvise(mmap.MADV_DONTNEED)
            return self._eot_positions[i]

    def _shard(self, i: int) -> np.ndarray:
        """Shard `i`'s tokens, mapped now if not already; the caller holds the lock."""
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i][1]
        shard, fd = self.shards[i], os.open(self._paths[i], os.O_RDONLY)
        try:
            mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        self.maps_opened += 1
        self._open[i] = (mapping, np.frombuffer(mapping, self.dtype, count=shard.tokens, offset=shard.offset))
        while len(self._open) > self.max_open:
            self._unmap(*self._open.popitem(last=False)[1])
        return self._open[i][1]

    @staticmethod
    def _unmap(mapping: mmap.mmap, view: np.ndarray) -> None:
        del view
        # If a caller still holds a view of the tokens, the mapping goes when the last view does.
        with contextlib.suppress(BufferError):
            mapping.close()

    def close(self) -> None:
        with self._lock:
            while self._open:
                self._unmap(*self._open.popitem()[1])

    def __enter__(self) -> "TokenDataset":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
