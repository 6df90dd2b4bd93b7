"""`gptforge prepare NAME`: text from a corpus, through a tokenizer, into DATA_DIR/NAME/{train,val}.bin +
meta.json.

Each dataset is one small registered function that says where its text comes from, how it splits into train
and val, and which tokenizer it uses; tokenizing the text on all cores and writing the files atomically are
shared. Memory stays constant however large the corpus: text is read, encoded and written in ~1 MB chunks.
This module wires the data package's rooms together and is imported by none of them: corpus.py gives the text,
files.py owns the format written (and reads it back), tokenizer.py owns the ids.
"""

import contextlib
import dataclasses
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

import numpy as np

from gptforge.atomic import atomic_path, check_writable
from gptforge.data.corpus import (
    CHUNK_BYTES,
    Chunk,
    Corpus,
    Documents,
    HFDocuments,
    SplitText,
    corpus_text,
    expand_inputs,
    load_hf_dataset,
)
from gptforge.data.files import META_FILE, SPLITS, Meta, token_dtype
from gptforge.errors import GptforgeError
from gptforge.mirror import Remote, fetch, mirror_dir
from gptforge.options import option, usage
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
BPE_DEFAULT_VOCAB = 8192


# ------------------------------------------------------------------------------------------------------------
# Options: nanoGPT-style --key=value, applied with options.apply_overrides.


@dataclass
class PrepareOptions:
    """Options every dataset takes."""

    data_dir: str = option("data", "output root: files go to DATA_DIR/NAME/")
    mirror: str | None = option(
        None, "local mirror tried before downloading (default: $GPTFORGE_DATA_MIRROR)"
    )
    num_proc: int = field(default_factory=lambda: os.cpu_count() or 1, metadata={"help": "tokenizer threads"})
    val_fraction: float = option(0.1, "share of the text held out as val.bin")

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise GptforgeError(f"--val_fraction={self.val_fraction} must be between 0 and 1 (exclusive)")
        if self.num_proc < 1:
            raise GptforgeError(f"--num_proc={self.num_proc} must be at least 1")


@dataclass
class TextOptions(PrepareOptions):
    """Options of `prepare text` (a user's own corpus)."""

    input: str = option("", "PATH[,PATH...]: .txt/.jsonl files, directories or globs")
    name: str = option("text", "output directory name under DATA_DIR")
    tokenizer: Literal["char", "gpt2", "bpe"] = option("gpt2", "char, gpt2 or bpe")
    vocab_size: int | None = option(None, f"bpe only: tokens to learn (default {BPE_DEFAULT_VOCAB})")
    text_field: str = option("text", "the field of each .jsonl record holding its text")
    errors: Literal["strict", "replace"] = option(
        "strict", "undecodable UTF-8: strict (stop) or replace (with U+FFFD)"
    )
    dtype: Literal["auto", "uint16", "uint32"] = option("auto", "token id type on disk")
    seed: int = option(2357, "chooses the val documents (several documents only)")

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

    val_fraction: float = option(0.0005, "share of the documents held out as val.bin")
    source: str = option(
        OPENWEBTEXT_HUB, "hub id, or a local save_to_disk directory or .parquet/.jsonl/.txt files"
    )
    revision: str = option(OPENWEBTEXT_REVISION, "hub revision (pinned)")
    text_field: str = option("text", "the column holding each document's text")
    seed: int = option(2357, "train_test_split seed")
    cache_dir: str | None = option(None, "Hugging Face datasets cache directory")


# ------------------------------------------------------------------------------------------------------------
# The registry: a dataset is a name, a line of help, its options and one function.

OptionsT = TypeVar("OptionsT", bound=PrepareOptions)


@dataclass(frozen=True)
class Dataset:
    """A registered dataset: `prepare(options)` writes DATA_DIR/NAME and returns its meta."""

    name: str
    summary: str
    options: type[PrepareOptions]
    prepare: Callable[[Any], Meta]

    def run(self, opts: PrepareOptions) -> Meta:
        """`prepare(opts)`, once the output root is known to be writable: before reading any text."""
        check_writable(opts.data_dir, "--data_dir")
        return self.prepare(opts)


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
    return usage(f"usage: gptforge prepare {name} [--key=value ...]\n\n{dataset.summary}", dataset.options())


@register("shakespeare_char", "tiny Shakespeare, one token per character (nanoGPT's shakespeare_char)")
def prepare_shakespeare_char(opts: PrepareOptions) -> Meta:
    out, corpus = _tiny_shakespeare(opts, "shakespeare_char")
    return write_dataset(out, corpus, CharTokenizer.from_text(corpus_text(corpus, desc="vocabulary")), opts)


@register("shakespeare", "tiny Shakespeare, GPT-2 BPE (nanoGPT's shakespeare)")
def prepare_shakespeare(opts: PrepareOptions) -> Meta:
    out, corpus = _tiny_shakespeare(opts, "shakespeare")
    return write_dataset(out, corpus, GPT2Tokenizer(mirror_dir(opts.mirror)), opts)


def _tiny_shakespeare(opts: PrepareOptions, name: str) -> tuple[Path, SplitText]:
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
    source = opts.source
    if source == OPENWEBTEXT_HUB and mirror is not None and (mirror / "openwebtext").is_dir():
        source = str(mirror / "openwebtext")
    documents, origin = load_hf_dataset(source, opts.revision, opts.cache_dir, opts.num_proc)
    if opts.text_field not in documents.column_names:
        raise GptforgeError(
            f"--source={opts.source} has no {opts.text_field!r} column (it has {documents.column_names}); "
            f"use --text_field"
        )
    # nanoGPT's split: a seeded shuffle of the documents, 0.05% of them for val.
    parts = documents.train_test_split(test_size=opts.val_fraction, seed=opts.seed, shuffle=True)
    corpus = HFDocuments({"train": parts["train"], "val": parts["test"]}, opts.text_field, origin)
    return write_dataset(Path(opts.data_dir) / "openwebtext", corpus, GPT2Tokenizer(mirror), opts)


# ------------------------------------------------------------------------------------------------------------
# Writing: encode chunks on `num_proc` threads (tokenizers release the GIL), append them in order.


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
        # Until meta.json is rewritten the directory reads as incomplete, never as old and new mixed.
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
    chunks: Iterable[Chunk], tokenizer: Tokenizer, files: dict[str, BinaryIO], dtype: np.dtype, num_proc: int
) -> dict[str, int]:
    eot = None if tokenizer.eot_token is None else np.array([tokenizer.eot_token], dtype=np.uint32)

    def encode(batch: list[Chunk]) -> list[tuple[str, np.ndarray]]:
        runs: list[tuple[str, list[np.ndarray]]] = []  # consecutive chunks of one split become one write
        for chunk in batch:
            if not runs or runs[-1][0] != chunk.split:
                runs.append((chunk.split, []))
            runs[-1][1].append(tokenizer.encode_to_numpy(chunk.text))
            if chunk.end_of_document and eot is not None:
                runs[-1][1].append(eot)
        return [(split, np.concatenate(ids).astype(dtype)) for split, ids in runs]

    counts = dict.fromkeys(files, 0)
    for runs in ordered_map(encode, _batched(chunks, CHUNK_BYTES), num_proc):
        for split, ids in runs:
            files[split].write(ids.data)
            counts[split] += len(ids)
    return counts


def _batched(chunks: Iterable[Chunk], max_chars: int) -> Iterator[list[Chunk]]:
    """Chunks grouped into batches of about `max_chars`, so small documents do not cost a thread hop each."""
    batch, size = [], 0
    for chunk in chunks:
        batch.append(chunk)
        size += len(chunk.text)
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
