"""`gptforge prepare NAME`: text from a source, through a tokenizer, into DATA_DIR/NAME/{train,val}.bin + meta.json.

Each dataset is one small registered function that says where its text comes from, how it splits into train and
val, and which tokenizer it uses; streaming the text, tokenizing it on all cores and writing the files atomically
are shared. Memory stays constant however large the corpus: text is read, encoded and written in ~1 MB pieces.
This module only writes token files; data.py reads them (and owns their format), tokenizer.py owns the ids.
"""

import codecs
import contextlib
import dataclasses
import glob
import hashlib
import json
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, Protocol, TypeVar

import numpy as np
from tqdm import tqdm

from gptforge.atomic import atomic_path
from gptforge.data import META_FILE, SPLITS, Meta, token_dtype
from gptforge.errors import GptforgeError
from gptforge.mirror import HOW_TO_MIRROR, Remote, fetch, file_sha256, mirror_dir
from gptforge.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer

TINY_SHAKESPEARE = Remote(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    mirror_path="tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)
OPENWEBTEXT_HUB = "Skylion007/openwebtext"
# The first revision of the hub repository without the loading script (which `datasets` >= 4 no longer runs):
# the corpus as 93 parquet shards under data/.
OPENWEBTEXT_REVISION = "cf22a3730519fbb9629cd35ddf1669bbfe9e2b97"
CHUNK_BYTES = 1 << 20  # text is read, encoded and written in pieces of about this size
BPE_DEFAULT_VOCAB = 8192


# ----------------------------------------------------------------------------------------------------------------
# Options: nanoGPT-style --key=value, applied with options.apply_overrides.


@dataclass
class PrepareOptions:
    """Options every dataset takes."""

    data_dir: str = field(default="data", metadata={"help": "output root: files go to DATA_DIR/NAME/"})
    mirror: str | None = field(
        default=None,
        metadata={"help": "local mirror tried before downloading (default: $GPTFORGE_DATA_MIRROR)"},
    )
    num_proc: int = field(default_factory=lambda: os.cpu_count() or 1, metadata={"help": "tokenizer threads"})
    val_fraction: float = field(default=0.1, metadata={"help": "share of the text held out as val.bin"})

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise GptforgeError(f"--val_fraction={self.val_fraction} must be between 0 and 1 (exclusive)")
        if self.num_proc < 1:
            raise GptforgeError(f"--num_proc={self.num_proc} must be at least 1")


@dataclass
class TextOptions(PrepareOptions):
    """Options of `prepare text` (a user's own corpus)."""

    input: str = field(
        default="", metadata={"help": "PATH[,PATH...]: .txt/.jsonl files, directories or globs"}
    )
    name: str = field(default="text", metadata={"help": "output directory name under DATA_DIR"})
    tokenizer: Literal["char", "gpt2", "bpe"] = field(default="gpt2", metadata={"help": "char, gpt2 or bpe"})
    vocab_size: int | None = field(
        default=None, metadata={"help": f"bpe only: tokens to learn (default {BPE_DEFAULT_VOCAB})"}
    )
    text_field: str = field(
        default="text", metadata={"help": "the field of each .jsonl record holding its text"}
    )
    errors: Literal["strict", "replace"] = field(
        default="strict", metadata={"help": "undecodable UTF-8: strict (stop) or replace (with U+FFFD)"}
    )
    dtype: Literal["auto", "uint16", "uint32"] = field(
        default="auto", metadata={"help": "token id type on disk"}
    )
    seed: int = field(default=2357, metadata={"help": "chooses the val documents (several documents only)"})

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vocab_size is not None and self.tokenizer != "bpe":
            raise GptforgeError(
                f"--vocab_size applies to --tokenizer=bpe only; {self.tokenizer}'s vocabulary is fixed"
            )
        if self.tokenizer == "bpe":  # fail before training, not after
            token_dtype(self.vocab_size or BPE_DEFAULT_VOCAB, self.dtype)
        if not self.name or self.name in (".", "..") or "/" in self.name or os.sep in self.name:
            raise GptforgeError(f"--name={self.name!r} must be a plain directory name")


@dataclass
class OpenWebTextOptions(PrepareOptions):
    """Options of `prepare openwebtext` (nanoGPT's defaults)."""

    val_fraction: float = field(
        default=0.0005, metadata={"help": "share of the documents held out as val.bin"}
    )
    source: str = field(
        default=OPENWEBTEXT_HUB,
        metadata={"help": "hub id, or a local save_to_disk directory or .parquet/.jsonl/.txt files"},
    )
    revision: str = field(default=OPENWEBTEXT_REVISION, metadata={"help": "hub revision (pinned)"})
    text_field: str = field(default="text", metadata={"help": "the column holding each document's text"})
    seed: int = field(default=2357, metadata={"help": "train_test_split seed"})
    cache_dir: str | None = field(default=None, metadata={"help": "Hugging Face datasets cache directory"})


# ----------------------------------------------------------------------------------------------------------------
# The registry: a dataset is a name, a line of help, its options and one function.

OptionsT = TypeVar("OptionsT", bound=PrepareOptions)


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: `prepare(options)` writes DATA_DIR/NAME and returns its meta."""

    name: str
    summary: str
    options: type[PrepareOptions]
    prepare: Callable[[Any], Meta]


DATASETS: dict[str, Dataset] = {}


def register(
    name: str, summary: str, options: type[OptionsT] = PrepareOptions
) -> Callable[[Callable[[OptionsT], Meta]], Callable[[OptionsT], Meta]]:
    """Register the decorated function as dataset `name`, configured by `options`."""

    def add(prepare: Callable[[OptionsT], Meta]) -> Callable[[OptionsT], Meta]:
        DATASETS[name] = Dataset(name, summary, options, prepare)
        return prepare

    return add


def get_dataset(name: str) -> Dataset:
    """The dataset called `name`; an unknown name is an error listing the known ones."""
    if name not in DATASETS:
        raise GptforgeError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


def prepare_usage(name: str | None = None) -> str:
    """`gptforge prepare --help` (the list of datasets), or one dataset's options with their defaults."""
    if name is None:
        rows = "\n".join(f"  {d.name:<17} {d.summary}" for d in DATASETS.values())
        return (
            f"usage: gptforge prepare NAME [--key=value ...]\n\ndatasets:\n{rows}\n\n"
            f"Run `gptforge prepare NAME --help` for a dataset's options."
        )
    dataset = get_dataset(name)
    defaults = dataset.options()
    options = {
        f"--{f.name}={getattr(defaults, f.name)}": f.metadata.get("help", "")
        for f in dataclasses.fields(defaults)
    }
    rows = "\n".join(f"  {option:<28} {help_}" for option, help_ in options.items())
    return f"usage: gptforge prepare {name} [--key=value ...]\n\n{dataset.summary}\n\noptions:\n{rows}"


@register("shakespeare_char", "tiny Shakespeare, one token per character (nanoGPT's shakespeare_char)")
def prepare_shakespeare_char(opts: PrepareOptions) -> Meta:
    out, corpus = _tiny_shakespeare(opts, "shakespeare_char")
    return write_dataset(out, corpus, CharTokenizer.from_text(corpus_text(corpus, desc="vocabulary")), opts)


@register("shakespeare", "tiny Shakespeare, GPT-2 BPE (nanoGPT's shakespeare)")
def prepare_shakespeare(opts: PrepareOptions) -> Meta:
    out, corpus = _tiny_shakespeare(opts, "shakespeare")
    return write_dataset(out, corpus, GPT2Tokenizer(mirror_dir(opts.mirror)), opts)


def _tiny_shakespeare(opts: PrepareOptions, name: str) -> tuple[Path, "SplitText"]:
    """The output directory and the text (from the mirror, else downloaded into the output directory once)."""
    out = Path(opts.data_dir) / name
    path = fetch(TINY_SHAKESPEARE, mirror_dir(opts.mirror), out / "input.txt")
    return out, SplitText(path, opts.val_fraction, url=TINY_SHAKESPEARE.url)


@register(
    "text", "your own corpus: --input=PATH[,PATH...] (.txt/.jsonl), --tokenizer=char|gpt2|bpe", TextOptions
)
def prepare_text(opts: TextOptions) -> Meta:
    files = expand_inputs(opts.input)
    corpus: Corpus
    if len(files) == 1 and files[0].suffix != ".jsonl":
        corpus = SplitText(files[0], opts.val_fraction, opts.errors)
    else:
        corpus = Documents(files, opts.val_fraction, opts.seed, opts.text_field, opts.errors, opts.input)
    tokenizer: Tokenizer
    if opts.tokenizer == "char":
        tokenizer = CharTokenizer.from_text(corpus_text(corpus, desc="vocabulary"))
    elif opts.tokenizer == "bpe":
        # Learned from the train split only, so val stays unseen text.
        train_text = corpus_text(corpus, "train", desc="train bpe")
        tokenizer = BPETokenizer.train(train_text, opts.vocab_size or BPE_DEFAULT_VOCAB)
    else:
        tokenizer = GPT2Tokenizer(mirror_dir(opts.mirror))
    return write_dataset(Path(opts.data_dir) / opts.name, corpus, tokenizer, opts, dtype=opts.dtype)


@register(
    "openwebtext",
    "OpenWebText (Hugging Face Skylion007/openwebtext), GPT-2 BPE: ~9B tokens",
    OpenWebTextOptions,
)
def prepare_openwebtext(opts: OpenWebTextOptions) -> Meta:
    mirror = mirror_dir(opts.mirror)
    documents, source = _load_hf_dataset(opts, mirror)
    if opts.text_field not in documents.column_names:
        raise GptforgeError(
            f"--source={opts.source} has no {opts.text_field!r} column (it has {documents.column_names}); use --text_field"
        )
    # nanoGPT's split: a seeded shuffle of the documents, 0.05% of them for val.
    parts = documents.train_test_split(test_size=opts.val_fraction, seed=opts.seed, shuffle=True)
    corpus = HFDocuments({"train": parts["train"], "val": parts["test"]}, opts.text_field, source)
    return write_dataset(Path(opts.data_dir) / "openwebtext", corpus, GPT2Tokenizer(mirror), opts)


# ----------------------------------------------------------------------------------------------------------------
# Corpora: where the text comes from, in order, cut into pieces tagged with their split.


@dataclass(frozen=True)
class Piece:
    """Part of a document, bound for one split; the tokenizer's end-of-text id follows the last part of a document."""

    split: str
    text: str
    end_of_document: bool


class Corpus(Protocol):
    def pieces(self, desc: str = "tokenize") -> Iterator[Piece]:
        """All the text in output order, with a progress bar labelled `desc`."""
        ...

    def source(self) -> dict[str, Any]:
        """What meta.json records about the origin of the text."""
        ...


def corpus_text(corpus: Corpus, split: str | None = None, desc: str = "read") -> Iterator[str]:
    """The text of `split` (default: all of it) in pieces: what a char or bpe vocabulary is learned from."""
    return (p.text for p in corpus.pieces(desc) if split in (None, p.split))


class SplitText:
    """One text file cut by characters: the first (1 - val_fraction) to train, the rest to val, like nanoGPT.

    As in nanoGPT's shakespeare prepare.py, no end-of-text token is added: the file is one document.
    """

    def __init__(self, path: Path, val_fraction: float, errors: str = "strict", url: str | None = None):
        self.path, self.errors, self.url = path, errors, url
        # A first pass counts the characters (nanoGPT splits at a character index) and finds decoding errors.
        self.n_chars = sum(len(chunk) for chunk in read_text(path, errors))
        self.n_train = int(self.n_chars * (1 - val_fraction))
        if self.n_chars == 0:
            raise GptforgeError(f"{path} is empty; give it some text")
        if not 0 < self.n_train < self.n_chars:
            raise GptforgeError(f"{path} has {self.n_chars} characters, too few to split with --val_fraction")

    def pieces(self, desc: str = "tokenize") -> Iterator[Piece]:
        start = 0
        with tqdm(total=self.n_chars, unit="char", unit_scale=True, desc=desc) as bar:
            for chunk in read_text(self.path, self.errors):
                cut = min(max(self.n_train - start, 0), len(chunk))
                if cut > 0:
                    yield Piece("train", chunk[:cut], False)
                if cut < len(chunk):
                    yield Piece("val", chunk[cut:], False)
                start += len(chunk)
                bar.update(len(chunk))

    def source(self) -> dict[str, Any]:
        origin = {"url": self.url} if self.url else {}
        return {
            **origin,
            "path": str(self.path),
            "sha256": file_sha256(self.path),
            "characters": self.n_chars,
        }


class Documents:
    """Many documents (each .txt file, each .jsonl record) in input order; a seeded random share goes to val."""

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

    def _documents(self) -> Iterator[Iterator[str]]:
        for path in self.files:
            if path.suffix == ".jsonl":
                for text in read_jsonl(path, self.text_field, self.errors):
                    yield iter([text])  # a record is one piece
            else:
                yield read_text(path, self.errors)

    def pieces(self, desc: str = "tokenize") -> Iterator[Piece]:
        with tqdm(total=len(self.is_val), unit="doc", desc=desc) as bar:
            for is_val, chunks in zip(self.is_val, self._documents(), strict=True):
                split = "val" if is_val else "train"
                previous = ""
                for i, chunk in enumerate(chunks):
                    if i:
                        yield Piece(split, previous, False)
                    previous = chunk
                yield Piece(split, previous, True)
                bar.update(1)

    def source(self) -> dict[str, Any]:
        return {
            "input": self.spec,
            "files": len(self.files),
            "documents": len(self.is_val),
            "sha256": files_sha256(self.files),
        }


class HFDocuments:
    """Documents of Hugging Face datasets, one per split."""

    def __init__(self, splits: dict[str, Any], text_field: str, source: dict[str, Any]):
        self.splits, self.text_field, self._source = splits, text_field, source

    def pieces(self, desc: str = "tokenize") -> Iterator[Piece]:
        with tqdm(total=sum(len(d) for d in self.splits.values()), unit="doc", desc=desc) as bar:
            for split, documents in self.splits.items():
                for batch in documents.select_columns([self.text_field]).iter(batch_size=1000):
                    for text in batch[self.text_field]:
                        yield Piece(split, text, True)
                    bar.update(len(batch[self.text_field]))

    def source(self) -> dict[str, Any]:
        return {**self._source, "documents": {split: len(d) for split, d in self.splits.items()}}


_HF_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}


def _load_hf_dataset(opts: OpenWebTextOptions, mirror: Path | None) -> tuple[Any, dict[str, Any]]:
    """The single split of `--source` (hub id, save_to_disk directory or data files) and its description."""
    try:
        import datasets
    except ImportError:
        raise GptforgeError(
            "prepare openwebtext needs Hugging Face datasets: pip install 'gptforge[data]'"
        ) from None
    source = opts.source
    if source == OPENWEBTEXT_HUB and mirror is not None and (mirror / "openwebtext").is_dir():
        source = str(mirror / "openwebtext")
    path = Path(source)
    num_proc = opts.num_proc if opts.num_proc > 1 else None
    if not path.exists():
        try:
            hub = datasets.load_dataset(
                source, revision=opts.revision, split="train", cache_dir=opts.cache_dir, num_proc=num_proc
            )
        except Exception as e:  # the hub client raises many unrelated types when offline or refused
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GptforgeError(
                f"cannot load {source} (revision {opts.revision}) from the Hugging Face hub: {reason}; offline? "
                f"pass --source=PATH (a save_to_disk directory or .parquet/.jsonl/.txt files), or {HOW_TO_MIRROR} "
                f"with openwebtext/ inside it"
            ) from e
        return hub, {"hub": source, "revision": opts.revision}
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        saved = datasets.load_from_disk(str(path))
        return (saved["train"] if isinstance(saved, datasets.DatasetDict) else saved), {"path": source}
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in _HF_BUILDERS)
    builders = {_HF_BUILDERS.get(p.suffix) for p in files}
    if len(builders) != 1 or None in builders:
        raise GptforgeError(f"--source={source} must hold files of one kind: .parquet, .jsonl/.json or .txt")
    builder = builders.pop()
    # A .txt file is one document, not one per line.
    kwargs = {"sample_by": "document"} if builder == "text" else {}
    documents = datasets.load_dataset(
        builder,
        data_files=[str(p) for p in files],
        split="train",
        cache_dir=opts.cache_dir,
        num_proc=num_proc,
        **kwargs,
    )
    return documents, {"path": source, "files": len(files), "sha256": files_sha256(files)}


def files_sha256(files: list[Path]) -> str:
    """One digest of many files: the sha256 of their `sha256sum` listing."""
    listing = "".join(f"{file_sha256(f)}  {f}\n" for f in files)
    return hashlib.sha256(listing.encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Reading text: streamed, decoded strictly (or with --errors=replace), cut where the tokens do not change.


def expand_inputs(spec: str) -> list[Path]:
    """The files `--input` names: comma-separated files, directories (their .txt/.jsonl files) and globs, in order."""
    if not spec:
        raise GptforgeError(
            "prepare text needs --input=PATH[,PATH...] (.txt or .jsonl files, directories or globs)"
        )
    files: list[Path] = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
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
                # A \ud800-style escape decodes to a lone surrogate, which is not text any tokenizer can encode.
                if b"\\u" in line and (bad := _SURROGATE.search(text)):
                    if errors != "replace":
                        raise GptforgeError(
                            f"{path}:{number}: {text_field!r} holds a lone surrogate {bad.group()!a}, not valid "
                            f"Unicode; fix the file or pass --errors=replace"
                        )
                    text = _SURROGATE.sub("\ufffd", text)
                yield text
            offset += len(line)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _count_records(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


# ----------------------------------------------------------------------------------------------------------------
# Writing: encode pieces on `num_proc` threads (tokenizers release the GIL), append to the .bin files in order.


def write_dataset(
    out: Path, corpus: Corpus, tokenizer: Tokenizer, opts: PrepareOptions, dtype: str = "auto"
) -> Meta:
    """Encode `corpus` into out/{train,val}.bin and write out/meta.json, atomically."""
    dtype = token_dtype(tokenizer.vocab_size, dtype)
    with contextlib.ExitStack() as stack:
        files = {}
        for split in SPLITS:
            tmp = stack.enter_context(atomic_path(out / f"{split}.bin"))
            files[split] = stack.enter_context(open(tmp, "wb"))
        counts = _encode(corpus.pieces(), tokenizer, files, np.dtype(dtype).newbyteorder("<"), opts.num_proc)
        for split, count in counts.items():
            if count == 0:
                raise GptforgeError(
                    f"the {split} split came out empty; give more text or change --val_fraction"
                )
        # From here until meta.json is rewritten the directory reads as incomplete, never as old and new mixed.
        (out / META_FILE).unlink(missing_ok=True)
        if isinstance(tokenizer, BPETokenizer):
            tokenizer.save(out / BPETokenizer.FILE)
    meta = Meta(
        tokenizer=tokenizer.spec(),
        vocab_size=tokenizer.vocab_size,
        dtype=dtype,
        tokens=counts,
        eot_token=tokenizer.eot_token,
        dataset=out.name,
        source=corpus.source(),
        options=dataclasses.asdict(opts),
    )
    meta.write(out)
    return meta


def _encode(
    pieces: Iterable[Piece], tokenizer: Tokenizer, files: dict[str, BinaryIO], dtype: np.dtype, num_proc: int
) -> dict[str, int]:
    eot = None if tokenizer.eot_token is None else np.array([tokenizer.eot_token], dtype=np.uint32)

    def encode(batch: list[Piece]) -> list[tuple[str, np.ndarray]]:
        runs: list[tuple[str, list[np.ndarray]]] = []  # consecutive pieces of one split become one write
        for piece in batch:
            if not runs or runs[-1][0] != piece.split:
                runs.append((piece.split, []))
            runs[-1][1].append(tokenizer.encode_to_numpy(piece.text))
            if piece.end_of_document and eot is not None:
                runs[-1][1].append(eot)
        return [(split, np.concatenate(ids).astype(dtype)) for split, ids in runs]

    counts = dict.fromkeys(files, 0)
    for runs in ordered_map(encode, _batched(pieces, CHUNK_BYTES), num_proc):
        for split, ids in runs:
            files[split].write(ids.data)
            counts[split] += len(ids)
    return counts


def _batched(pieces: Iterable[Piece], max_chars: int) -> Iterator[list[Piece]]:
    """Pieces grouped into batches of about `max_chars`, so small documents do not cost a thread hop each."""
    batch, size = [], 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """`map(fn, items)` on `workers` threads, in order, with at most 2 * workers items in flight."""
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="gptforge-encode") as pool:
        pending: deque[Future[R]] = deque()
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
