"""Where the text comes from: a corpus yields all its text in output order, in chunks tagged with their split,
one split after the other (all of train, then all of val).

A corpus is one text file cut by characters (nanoGPT's split), many documents (.txt files, .jsonl records)
with a seeded share held out for val, or the splits of a Hugging Face dataset (the hub, a saved dataset, or
local .parquet/.jsonl/.txt files). Text is streamed in ~1 MB pieces, decoded strictly (or with
--errors=replace) and cut only where the tokens cannot change, so memory stays constant however large the
corpus. A corpus also describes its input (each file's sha256, or the hub dataset's revision and fingerprint),
which is how a re-run tells the same input from a changed one. This module knows text and files, not tokens:
it imports nothing of the data package, and prepare.py is what turns its chunks into token files.
"""

import codecs
import glob
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.mirror import HOW_TO_MIRROR, file_sha256

CHUNK_BYTES = 1 << 20  # text is read, encoded and written in pieces of about this size


@dataclass(frozen=True)
class Chunk:
    """Part of a document, bound for one split; the tokenizer's end-of-text id follows the last part of a
    document."""

    split: str
    text: str
    end_of_document: bool


class Corpus(Protocol):
    def pieces(self) -> Iterator[Chunk]:
        """All the text in output order, one split after the other."""
        ...

    def size(self) -> int:
        """About how many bytes of UTF-8 text `pieces` yields (what progress is measured against)."""
        ...

    def source(self) -> dict[str, Any]:
        """What meta.json records about the origin of the text: the same for the same input, wherever it
        is."""
        ...


def corpus_text(corpus: Corpus, split: str | None = None) -> Iterator[str]:
    """The text of `split` (default: all of it) in pieces: what a char or bpe vocabulary is learned from."""
    return (c.text for c in corpus.pieces() if split in (None, c.split))


def file_record(path: Path) -> dict[str, Any]:
    """An input file as meta.json records it: path, size and sha256."""
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}


def scan_utf8(path: Path) -> tuple[dict[str, Any], int]:
    """`file_record(path)` and the number of characters of the file read as UTF-8, in one pass over its bytes:
    each character has one byte that is not a continuation byte (0b10xxxxxx). Exact for valid UTF-8; invalid
    UTF-8 is found when the text is decoded."""
    digest, chars = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            digest.update(block)
            chars += len(block) - int(np.count_nonzero((np.frombuffer(block, np.uint8) & 0xC0) == 0x80))
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}, chars


class SplitText:
    """One text file cut by characters: the first (1 - val_fraction) to train, the rest to val, like nanoGPT.

    As in nanoGPT's shakespeare prepare.py, no end-of-text token is added: the file is one document.
    """

    def __init__(self, path: Path, val_fraction: float, errors: str = "strict", url: str | None = None):
        self.path, self.errors, self.url = path, errors, url
        # A first pass hashes the file and counts its characters: nanoGPT splits at a character index.
        record, self.n_chars = scan_utf8(path)
        if errors != "strict":  # replaced bytes are characters too
            self.n_chars = sum(len(text) for text in read_text(path, errors))
        self.n_train = int(self.n_chars * (1 - val_fraction))
        if self.n_chars == 0:
            raise GptforgeError(f"{path} is empty; give it some text")
        if not 0 < self.n_train < self.n_chars:
            raise GptforgeError(f"{path} has {self.n_chars} characters, too few to split with --val_fraction")
        self.inputs = [record]

    def pieces(self) -> Iterator[Chunk]:
        start = 0
        for text in read_text(self.path, self.errors):
            cut = min(max(self.n_train - start, 0), len(text))
            if cut > 0:
                yield Chunk("train", text[:cut], False)
            if cut < len(text):
                yield Chunk("val", text[cut:], False)
            start += len(text)

    def size(self) -> int:
        return self.path.stat().st_size

    def source(self) -> dict[str, Any]:
        origin = {"url": self.url} if self.url else {}
        return {**origin, "inputs": self.inputs, "characters": self.n_chars}


class Documents:
    """Many documents (each .txt file, each .jsonl record) in input order; a seeded random share goes to
    val."""

    def __init__(
        self, files: list[Path], val_fraction: float, seed: int, text_field: str, errors: str, spec: str
    ):
        self.files, self.text_field, self.errors, self.spec = files, text_field, errors, spec
        n_docs = sum(_count_records(f) if f.suffix == ".jsonl" else 1 for f in files)
        if n_docs < 2:
            raise GptforgeError(
                f"--input={spec} holds {n_docs} document(s); splitting by document needs at least 2 "
                f"(a single .txt file is split by characters instead)"
            )
        n_val = min(max(1, round(n_docs * val_fraction)), n_docs - 1)
        self.is_val = np.zeros(n_docs, dtype=bool)
        self.is_val[np.random.default_rng(seed).choice(n_docs, size=n_val, replace=False)] = True
        self.inputs = [file_record(f) for f in files]

    def _documents(self) -> Iterator[Iterator[str]]:
        for path in self.files:
            if path.suffix == ".jsonl":
                for text in read_jsonl(path, self.text_field, self.errors):
                    yield iter([text])  # a record is one piece
            else:
                yield read_text(path, self.errors)

    def pieces(self) -> Iterator[Chunk]:
        for split, wanted in (("train", False), ("val", True)):
            # A .txt document of the other split is skipped unread: its reader is never started.
            for is_val, texts in zip(self.is_val, self._documents(), strict=True):
                if is_val != wanted:
                    continue
                previous = ""
                for i, text in enumerate(texts):
                    if i:
                        yield Chunk(split, previous, False)
                    previous = text
                yield Chunk(split, previous, True)

    def size(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def source(self) -> dict[str, Any]:
        return {"input": self.spec, "inputs": self.inputs, "documents": len(self.is_val)}


class HFDocuments:
    """Documents of Hugging Face datasets, one per split; `size` is the bytes of their text column."""

    def __init__(self, splits: dict[str, Any], text_field: str, source: dict[str, Any], size: int):
        self.splits, self.text_field, self._source, self._size = splits, text_field, source, size

    def pieces(self) -> Iterator[Chunk]:
        for split, documents in self.splits.items():
            for batch in documents.select_columns([self.text_field]).iter(batch_size=1000):
                for text in batch[self.text_field]:
                    yield Chunk(split, text, True)

    def size(self) -> int:
        return self._size

    def source(self) -> dict[str, Any]:
        return {**self._source, "documents": {split: len(d) for split, d in self.splits.items()}}


_HF_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


@dataclass(frozen=True)
class HubDataset:
    """A dataset of the Hugging Face hub: its id, subset and revision, and the mirror folder that stands in
    for it."""

    id: str
    revision: str
    name: str | None = None
    mirror_path: str = ""


def load_hf_dataset(
    source: str, hub: HubDataset, cache_dir: str | None, num_proc: int
) -> tuple[Any, dict[str, Any]]:
    """The single split of `source` (a hub id, read at `hub`'s subset and revision; a save_to_disk directory;
    data files, a directory of them or a glob) and its description: what `prepare openwebtext` and `prepare
    fineweb` read."""
    try:
        import datasets
    except ImportError:
        raise GptforgeError(
            f"{hub.id} is read with Hugging Face datasets: pip install 'gptforge[data]'"
        ) from None
    path = Path(source).expanduser()
    workers = num_proc if num_proc > 1 else None
    is_glob = any(c in source for c in "*?[")
    if not is_glob and not path.exists():
        try:
            documents = datasets.load_dataset(
                source, hub.name, revision=hub.revision, split="train", cache_dir=cache_dir, num_proc=workers
            )
        except Exception as e:  # the hub client raises many unrelated types when offline or refused
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            subset = f" {hub.name}" if hub.name else ""
            raise GptforgeError(
                f"cannot load {source}{subset} (revision {hub.revision}) from the Hugging Face hub: "
                f"{reason}; offline? pass --source=PATH (a save_to_disk directory or .parquet/.jsonl/.txt "
                f"files), or {HOW_TO_MIRROR} with {hub.mirror_path}/ inside it"
            ) from e
        # The fingerprint is the hash `datasets` keeps of the files it loaded: a changed upstream changes it.
        origin = {
            "hub": source,
            "name": hub.name,
            "revision": hub.revision,
            "fingerprint": documents._fingerprint,
        }
        return documents, origin
    if is_glob:
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    elif (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        inputs = [file_record(p) for p in sorted(path.rglob("*")) if p.is_file()]
        return (saved["train"] if isinstance(saved, datasets.DatasetDict) else saved), {
            "path": source,
            "inputs": inputs,
        }
    else:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _HF_BUILDERS)
    builders = {_HF_BUILDERS.get(p.suffix) for p in files}
    if not files:
        raise GptforgeError(f"--source={source} matches no .parquet, .jsonl/.json or .txt files")
    if len(builders) != 1 or None in builders:
        raise GptforgeError(f"--source={source} must hold files of one kind: .parquet, .jsonl/.json or .txt")
    builder = builders.pop()
    # A .txt file is one document, not one per line.
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    documents = datasets.load_dataset(
        builder,
        data_files=[str(p) for p in files],
        split="train",
        cache_dir=cache_dir,
        num_proc=workers,
        **kwargs,
    )
    return documents, {"path": source, "inputs": [file_record(p) for p in files]}


# ------------------------------------------------------------------------------------------------------------
# Reading text: streamed, decoded strictly (or with --errors=replace), cut where the tokens do not change.


def expand_inputs(spec: str) -> list[Path]:
    """The files `--input` names: comma-separated files, directories (their .txt/.jsonl files) and globs, in
    order. A path that exists is taken whole, so a file whose name has a comma needs no escaping."""
    if not spec:
        raise GptforgeError(
            "prepare text needs --input=PATH[,PATH...] (.txt or .jsonl files, directories or globs)"
        )
    files: list[Path] = []
    items = [spec] if Path(spec).expanduser().exists() else [s.strip() for s in spec.split(",")]
    for item in filter(None, items):
        path = Path(item).expanduser()
        if any(c in item for c in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        elif path.is_file():
            found = [path]
        else:
            raise GptforgeError(f"--input: {item} does not exist")
        if not found:
            raise GptforgeError(f"--input: {item} matches no .txt or .jsonl files")
        files += [f for f in found if f not in files]
    return files


def read_text(path: Path, errors: str = "strict", chunk_bytes: int = CHUNK_BYTES) -> Iterator[str]:
    """The UTF-8 text of `path` in pieces of about `chunk_bytes`, cut only where the tokens cannot change."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors)
    carry, offset = "", 0

    def decode(block: bytes, final: bool = False) -> str:
        pending = len(decoder.getstate()[0])  # bytes of a split character held back from the previous block
        try:
            return decoder.decode(block, final)
        except UnicodeDecodeError as e:
            at = offset - pending + e.start
            raise GptforgeError(
                f"{path}: invalid UTF-8 at byte {at:,}; fix the file or pass --errors=replace"
            ) from None

    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            text = carry + decode(block)
            offset += len(block)
            cut = cut_point(text)
            if cut == 0 and len(text) < 64 * chunk_bytes:
                # No safe cut yet: read on. (A text without spaces is cut anywhere once 64 blocks pile up.)
                carry = text
                continue
            cut = cut or len(text)
            yield text[:cut]
            carry = text[cut:]
        if text := carry + decode(b"", final=True):
            yield text


def cut_point(text: str) -> int:
    """The last index where `text` can be cut without changing its BPE tokens, or 0 if there is none.

    GPT-2's pre-tokenizer regex (the byte-level `bpe` uses the same) always splits between a non-space and a
    following space or newline, and how it splits the rest never depends on what came before. Encoding the two
    sides separately therefore gives exactly the tokens of encoding the whole text at once, as nanoGPT does.
    """
    end = len(text)
    while (i := max(text.rfind(" ", 0, end), text.rfind("\n", 0, end))) > 0:
        if "!" <= text[i - 1] <= "~":  # printable ASCII: not whitespace to any regex engine
            return i
        end = i
    return 0


def read_jsonl(path: Path, text_field: str, errors: str = "strict") -> Iterator[str]:
    """The `text_field` of every record of a JSON Lines file (blank lines skipped)."""
    offset = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    record = json.loads(line.decode("utf-8", errors))
                except UnicodeDecodeError as e:
                    raise GptforgeError(
                        f"{path}: invalid UTF-8 at byte {offset + e.start:,} (line {number}); "
                        f"fix the file or pass --errors=replace"
                    ) from None
                except json.JSONDecodeError as e:
                    raise GptforgeError(
                        f"{path}:{number}: not valid JSON ({e.msg}); each line must be one record"
                    ) from None
                text = record.get(text_field) if isinstance(record, dict) else None
                if not isinstance(text, str):
                    raise GptforgeError(
                        f"{path}:{number}: no string field {text_field!r}; name it with --text_field"
                    )
                # A \ud800-style escape decodes to a lone surrogate, which is not text any tokenizer can
                # encode.
                if b"\\u" in line and (bad := _SURROGATE.search(text)):
                    if errors != "replace":
                        raise GptforgeError(
                            f"{path}:{number}: {text_field!r} holds a lone surrogate {bad.group()!a}, not "
                            f"valid Unicode; fix the file or pass --errors=replace"
                        )
                    text = _SURROGATE.sub("\ufffd", text)
                yield text
            offset += len(line)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _count_records(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())
