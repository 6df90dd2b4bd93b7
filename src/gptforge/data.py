"""Token files on disk and the training batches drawn from them.

A prepared dataset is a directory with `train.bin` and `val.bin` (one flat stream of little-endian uint16 token ids,
uint32 when the vocabulary needs it: the files nanoGPT reads with `np.memmap`) and `meta.json`, written last by
`gptforge prepare`: tokenizer, vocab size, dtype, token counts, source. This module owns that format (reading and
checking it) and turns it into batches. Where the text came from is datasets.py's business; what the ids mean is
tokenizer.py's.
"""

import contextlib
import dataclasses
import json
import mmap
import pickle
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge import __version__
from gptforge.atomic import atomic_write_text
from gptforge.errors import GptforgeError
from gptforge.tokenizer import CharTokenizer, Tokenizer, from_spec

SPLITS = ("train", "val")
META_FILE = "meta.json"
DTYPES = ("uint16", "uint32")


def token_dtype(vocab_size: int, requested: str = "auto") -> str:
    """uint16 (nanoGPT's format) unless the vocabulary exceeds 65,535 ids, then uint32; a too-small choice is an error."""
    needed = "uint16" if vocab_size <= 65535 else "uint32"
    if requested == "auto":
        return needed
    if requested not in DTYPES:
        raise GptforgeError(f"dtype {requested!r} is not one of auto, {', '.join(DTYPES)}")
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
        """Read and check a dataset directory: meta.json (or a nanoGPT char meta.pkl) and the sizes of its .bin files."""
        directory = Path(directory)
        if (directory / META_FILE).is_file():
            meta = cls._from_json(directory / META_FILE)
        elif (directory / "meta.pkl").is_file():
            meta = _from_nanogpt_pkl(directory)
        elif not directory.is_dir():
            raise GptforgeError(
                f"no dataset at {directory}; create it with `gptforge prepare NAME --data_dir={directory.parent}`"
            )
        else:
            raise GptforgeError(
                f"{directory / META_FILE} is missing, so {directory} is incomplete (an interrupted prepare?); "
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
        if meta.dtype not in DTYPES:
            raise GptforgeError(f"{path}: dtype {meta.dtype!r} is not one of {', '.join(DTYPES)}")
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
                    f"{path} {found} but meta.json says {count:,} {self.dtype} tokens ({count * itemsize:,} bytes); "
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
        # memmap every batch. Dropping them keeps one long-lived mapping flat; the OS page cache still holds them.
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


class BatchSampler:
    """The window starts of every step's global batch: a pure function of (seed, split, step).

    With replacement (nanoGPT's sampling) each row starts anywhere in `[0, n_tokens - block_size)`. Without, the
    data is cut into non-overlapping windows and every epoch visits each window once, in an order drawn afresh per
    epoch. Either way nothing but `step` changes as training runs, so the sampler's state is that one integer.
    """

    def __init__(
        self,
        n_tokens: int,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 1337,
        split: str = "train",
        replacement: bool = True,
    ):
        if block_size < 1 or batch_size < 1 or seed < 0:
            raise GptforgeError("block_size and batch_size must be positive and seed non-negative")
        if n_tokens < block_size + 1:
            raise GptforgeError(
                f"the {split} split has {n_tokens:,} tokens, fewer than block_size + 1 = {block_size + 1}; "
                f"use a smaller --block_size or more data"
            )
        self.n_tokens, self.block_size, self.batch_size = n_tokens, block_size, batch_size
        self.seed, self.split, self.replacement = seed, split, replacement
        self.n_windows = (n_tokens - 1) // block_size  # window k is tokens[k*B : k*B + B + 1]
        self._key = [seed, zlib.crc32(split.encode())]

    def starts(self, step: int) -> np.ndarray:
        """The `batch_size` window starts of global step `step` (int64)."""
        if self.replacement:
            rng = np.random.default_rng([*self._key, 0, step])
            return rng.integers(0, self.n_tokens - self.block_size, size=self.batch_size)
        rows = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, positions = np.divmod(rows, self.n_windows)
        windows = np.empty_like(rows)
        for epoch in np.unique(epochs):  # a batch spans at most a few epochs
            here = epochs == epoch
            windows[here] = shuffle_index(positions[here], self.n_windows, [*self._key, 1, int(epoch)])
        return windows * self.block_size


def shuffle_index(index: np.ndarray, n: int, key: list[int]) -> np.ndarray:
    """`perm[index]` for a random permutation `perm` of `range(n)` chosen by `key`, without building `perm`.

    A 4-round Feistel network is a bijection of the integers below an even power of two; re-applying it to values
    that land at or above `n` ("cycle walking", under 4 rounds on average) turns it into a bijection of `range(n)`.
    An epoch over billions of tokens is thus shuffled in constant memory.
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    round_keys = np.random.default_rng(key).integers(0, 1 << 63, size=4, dtype=np.uint64)
    values = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(len(values), dtype=bool)
    with np.errstate(over="ignore"):  # the mixing multiplies wrap around on purpose
        while todo.any():
            left, right = values[todo] >> np.uint64(half), values[todo] & low
            for round_key in round_keys:
                left, right = right, left ^ (_mix(right ^ round_key) & low)
            values[todo] = (left << np.uint64(half)) | right
            todo = values >= n
    return values.astype(np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class Batches:
    """This process's share of every step's global batch, as (x, y) int64 tensors on `device`.

    The global batch of step s is `batch_size` rows of `block_size` tokens (all ranks and micro-steps together);
    rank r of `world_size` takes rows `[r * batch_size // world_size, (r + 1) * batch_size // world_size)`, so the
    data a step sees does not depend on how many processes share it. On CUDA the rows go through pinned memory with
    non-blocking copies; `prefetch=True` gathers the next step's rows on a background thread meanwhile.
    """

    def __init__(
        self,
        dataset: TokenDataset,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 1337,
        replacement: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        prefetch: bool = False,
        step: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise GptforgeError(f"rank {rank} is not in [0, {world_size})")
        if batch_size % world_size:
            raise GptforgeError(
                f"the global batch of {batch_size} rows does not split evenly over {world_size} processes"
            )
        self.dataset = dataset
        self.sampler = BatchSampler(
            len(dataset), block_size, batch_size, seed=seed, split=dataset.split, replacement=replacement
        )
        share = batch_size // world_size
        self._rows = slice(rank * share, (rank + 1) * share)
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gptforge-prefetch") if prefetch else None
        self._next: tuple[int, Future] | None = None
        self.step = step

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) of global step `step`; y is x shifted by one token."""
        if self._next is not None and self._next[0] == step:
            x, y = self._next[1].result()
        else:
            x, y = self._host(step)
        if self._pool is not None:
            self._next = (step + 1, self._pool.submit(self._host, step + 1))
        return x.to(self.device, non_blocking=self._pin), y.to(self.device, non_blocking=self._pin)

    def _host(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.dataset.windows(self.sampler.starts(step)[self._rows], self.sampler.block_size + 1)
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))
        return (x.pin_memory(), y.pin_memory()) if self._pin else (x, y)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.get(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position (`step`) plus the settings it is only meaningful with: a few integers for a checkpoint."""
        s = self.sampler
        return {
            "step": self.step,
            "seed": s.seed,
            "block_size": s.block_size,
            "batch_size": s.batch_size,
            "replacement": int(s.replacement),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        changed = [k for k in mine if k != "step" and int(state[k]) != mine[k]]
        if changed:
            diffs = ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed)
            raise GptforgeError(f"cannot resume the data order: the batch settings changed ({diffs})")
        self.step = int(state["step"])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
