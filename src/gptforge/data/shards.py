"""Writing a dataset's token files so that an interrupted `gptforge prepare` resumes where it stopped.

Each split is cut into shards of `shard_tokens` tokens (the last one shorter). A shard is written to
`NAME.partial`, fsynced, renamed to `{split}_{index:06d}.bin`, and only then recorded, with its token count
and sha256, in `progress.json`, which is rewritten atomically each time together with how far into the stream
of encoded batches the recorded shards reach. So after `kill -9` at any moment the directory holds finished
shards that progress.json lists, at most one `.partial` file and perhaps a temporary of progress.json; the
next run removes those two, skips the input the finished shards cover and writes the same bytes an
uninterrupted run would. At the end a split that fits in one shard becomes the single `{split}.bin`
(nanoGPT's shape), meta.json is written and progress.json removed.

The output directory is locked while a prepare writes it. This module knows token arrays, files and the
progress record; what the tokens mean and where the text came from are the caller's business.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from gptforge.atomic import FILE_MODE, atomic_write_text
from gptforge.data.files import META_FILE, SPLITS
from gptforge.errors import GptforgeError

PROGRESS_FILE = "progress.json"
PARTIAL = ".partial"
# What a prepare may leave behind when killed: its partial shard and the temporaries of atomic writes.
_LEFTOVER = re.compile(rf"(.+{re.escape(PARTIAL)}|\..+\.tmp-\d+)")
_TOKEN_FILE = re.compile(rf"({'|'.join(SPLITS)})(_\d{{6}})?\.bin")


@contextlib.contextmanager
def locked(out: Path) -> Iterator[None]:
    """Hold `out` (created if needed) for one prepare, and clear what a killed one left in it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GptforgeError(
                f"another gptforge prepare is writing {out}; wait for it to finish or use another --data_dir"
            ) from None
        for path in out.iterdir():
            if _LEFTOVER.fullmatch(path.name) and path.is_file():
                path.unlink()
        yield
    finally:
        os.close(fd)


def remove_dataset(out: Path) -> None:
    """Delete what a prepare wrote in `out` (meta.json last written, token files, progress), nothing else."""
    (out / META_FILE).unlink(missing_ok=True)
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    for path in out.iterdir():
        if _TOKEN_FILE.fullmatch(path.name) and path.is_file():
            path.unlink()


def read_progress(out: Path) -> dict[str, Any] | None:
    """The progress record of an unfinished prepare in `out`, or None."""
    path = out / PROGRESS_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):  # written atomically: only a hand edit gets here
        raise GptforgeError(
            f"{path} is not a gptforge progress file; pass --overwrite to start over"
        ) from None


def save_progress(out: Path, progress: dict[str, Any]) -> None:
    """Write progress.json atomically (fsynced, renamed, the directory fsynced)."""
    atomic_write_text(out / PROGRESS_FILE, json.dumps(progress, indent=1) + "\n")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ShardWriter:
    """Appends each encoded batch's ids to the current shard of its split, in stream order.

    `progress` is the record to continue (its "shards" and "position", a [batches done, tokens of the next
    batch done] pair), saved to progress.json whenever a shard is finished. Splits come one after another:
    the first batch of a new split finishes the last shard of the previous one.
    """

    def __init__(self, out: Path, progress: dict[str, Any], shard_tokens: int):
        self.out, self.progress, self.shard_tokens = out, progress, shard_tokens
        self.dtype = np.dtype(progress["dtype"]).newbyteorder("<")
        self.shards: dict[str, list[dict[str, Any]]] = progress["shards"]
        for split, shards in self.shards.items():
            for shard in shards:
                path = self._done_path(split, shard)
                size = path.stat().st_size if path.is_file() else None
                if size != shard["tokens"] * self.dtype.itemsize:
                    raise GptforgeError(
                        f"{path} is missing or changed since {out / PROGRESS_FILE} recorded it; "
                        f"pass --overwrite to start over"
                    )
        self.split: str | None = None  # the split of the open shard
        self.file: BinaryIO | None = None
        self.tokens = 0
        self.sha256 = hashlib.sha256()

    def _done_path(self, split: str, shard: dict[str, Any]) -> Path:
        path = self.out / shard["file"]
        single = self.out / f"{split}.bin"  # a finished split of one shard, renamed by an interrupted finish
        return single if not path.exists() and len(self.shards[split]) == 1 and single.is_file() else path

    @property
    def position(self) -> tuple[int, int]:
        batches, tokens = self.progress["position"]
        return batches, tokens

    def write(self, batch: int, split: str, ids: np.ndarray, skip: int = 0) -> None:
        """Append batch number `batch` (all of one split), less its first `skip` ids (already written)."""
        if self.split is not None and self.split != split:
            self._finish_shard((batch, 0))
        start = skip
        while start < len(ids):
            if self.file is None:
                self._open(split)
            take = min(len(ids) - start, self.shard_tokens - self.tokens)
            data = ids[start : start + take].astype(self.dtype, copy=False).data
            self.file.write(data)
            self.sha256.update(data)
            self.tokens += take
            start += take
            if self.tokens == self.shard_tokens:
                self._finish_shard((batch, start) if start < len(ids) else (batch + 1, 0))

    def _open(self, split: str) -> None:
        self.split = split
        self.name = f"{split}_{len(self.shards.setdefault(split, [])):06d}.bin"
        self.file = open(self.out / (self.name + PARTIAL), "wb")  # noqa: SIM115 (closed by _finish_shard)
        self.tokens, self.sha256 = 0, hashlib.sha256()

    def _finish_shard(self, position: tuple[int, int]) -> None:
        assert self.file is not None and self.split is not None
        self.file.flush()
        os.fsync(self.file.fileno())
        os.fchmod(self.file.fileno(), FILE_MODE)
        self.file.close()
        self.file = None
        os.replace(self.out / (self.name + PARTIAL), self.out / self.name)
        _fsync_dir(self.out)
        record = {"file": self.name, "tokens": self.tokens, "sha256": self.sha256.hexdigest()}
        self.shards[self.split].append(record)
        self.progress["position"] = list(position)
        self.split = None
        save_progress(self.out, self.progress)

    def finish(self, batches: int) -> dict[str, list[dict[str, Any]]]:
        """Finish the open shard (the stream had `batches` batches); rename each split of a single shard to
        `{split}.bin`. Returns the shards of the splits that keep several, as meta.json lists them."""
        if self.file is not None:
            self._finish_shard((batches, 0))
        for split, shards in self.shards.items():
            if len(shards) == 1 and (self.out / shards[0]["file"]).exists():
                os.replace(self.out / shards[0]["file"], self.out / f"{split}.bin")
        _fsync_dir(self.out)
        return {split: shards for split, shards in self.shards.items() if len(shards) > 1}

    def abort(self) -> None:
        """Drop the open shard (an error or Ctrl-C): the finished ones stay for the next run."""
        if self.file is not None:
            self.file.close()
            self.file = None
            (self.out / (self.name + PARTIAL)).unlink(missing_ok=True)
