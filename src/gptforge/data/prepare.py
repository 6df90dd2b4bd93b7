"""`gptforge prepare NAME`: text from a corpus, through a tokenizer, into DATA_DIR/NAME/{train,val}.bin (or
shards of them) + meta.json.

Each dataset is one small registered function that says where its text comes from, how it splits into train
and val, and which tokenizer it uses; tokenizing the text on `--num_proc` processes and writing the files are
shared. Memory stays constant however large the corpus: text is read, encoded and written in ~1 MB batches,
a few in flight. The output is resumable: a prepare killed at any moment continues, run again, from the shards
it finished, into the same bytes; a re-run on the same input with the same options finds the work done, and on
changed input refuses (--overwrite starts over). This module wires the data package's rooms together and is
imported by none of them: corpus.py gives the text, shards.py writes the token files resumably, files.py owns
the format, progress.py reports, tokenizer.py owns the ids.
"""

import contextlib
import dataclasses
import itertools
import json
import multiprocessing
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import numpy as np

from gptforge.atomic import check_writable
from gptforge.data.corpus import (
    CHUNK_BYTES,
    Chunk,
    Corpus,
    Documents,
    HFDocuments,
    HubDataset,
    SplitText,
    corpus_text,
    expand_inputs,
    load_hf_dataset,
)
from gptforge.data.files import META_FILE, SPLITS, Meta, token_dtype
from gptforge.data.progress import Progress
from gptforge.data.shards import (
    PROGRESS_FILE,
    ShardWriter,
    locked,
    read_progress,
    remove_dataset,
    save_progress,
)
from gptforge.errors import GptforgeError
from gptforge.mirror import Remote, fetch, mirror_dir
from gptforge.options import option, usage
from gptforge.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer, Tokenizer, from_spec

TINY_SHAKESPEARE = Remote(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    mirror_path="tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
)
# The first revision of the hub repository without the loading script (which `datasets` >= 4 no longer runs):
# the corpus as 93 parquet shards under data/.
OPENWEBTEXT = HubDataset(
    "Skylion007/openwebtext", "cf22a3730519fbb9629cd35ddf1669bbfe9e2b97", mirror_path="openwebtext"
)
# FineWeb's 10B-token samples (what llm.c and modded-nanogpt train GPT-2 on), as parquet files.
FINEWEB = HubDataset("HuggingFaceFW/fineweb", "main", "sample-10BT", mirror_path="fineweb")
FINEWEB_EDU = HubDataset("HuggingFaceFW/fineweb-edu", "main", "sample-10BT", mirror_path="fineweb-edu")
BPE_DEFAULT_VOCAB = 8192
SHARD_TOKENS = 100_000_000  # llm.c's and modded-nanogpt's FineWeb shards
# Options that change how the work is done, not the bytes written: a re-run may change them and still resume.
NOT_IN_OUTPUT = ("data_dir", "mirror", "num_proc", "cache_dir", "overwrite")
SOURCE_HELP = (
    "hub id, or local .parquet/.jsonl/.txt files (a file, directory or glob), or a save_to_disk directory"
)


# ------------------------------------------------------------------------------------------------------------
# Options: nanoGPT-style --key=value, applied with options.apply_overrides.


@dataclass
class PrepareOptions:
    """Options every dataset takes."""

    data_dir: str = option("data", "output root: files go to DATA_DIR/NAME/")
    mirror: str | None = option(
        None, "local mirror tried before downloading (default: $GPTFORGE_DATA_MIRROR)"
    )
    num_proc: int = field(
        default_factory=lambda: os.cpu_count() or 1, metadata={"help": "processes that tokenize"}
    )
    val_fraction: float = option(0.1, "share of the text held out as val.bin")
    shard_tokens: int = option(
        SHARD_TOKENS, "a split of more tokens is written as shards {split}_000000.bin, ... of this many"
    )
    overwrite: bool = option(False, "start over: replace a finished or unfinished dataset of other input")

    def __post_init__(self) -> None:
        if not 0 < self.val_fraction < 1:
            raise GptforgeError(f"--val_fraction={self.val_fraction} must be between 0 and 1 (exclusive)")
        if self.num_proc < 1:
            raise GptforgeError(f"--num_proc={self.num_proc} must be at least 1")
        if self.shard_tokens < 1:
            raise GptforgeError(f"--shard_tokens={self.shard_tokens} must be at least 1")


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
    source: str = option(OPENWEBTEXT.id, SOURCE_HELP)
    revision: str = option(OPENWEBTEXT.revision, "hub revision (pinned)")
    text_field: str = option("text", "the column holding each document's text")
    seed: int = option(2357, "train_test_split seed")
    cache_dir: str | None = option(None, "Hugging Face datasets cache directory")


@dataclass
class FineWebOptions(OpenWebTextOptions):
    """Options of `prepare fineweb`: the sample-10BT subset, ~10B GPT-2 tokens."""

    val_fraction: float = option(0.001, "share of the documents held out for val (~10M tokens)")
    source: str = option(FINEWEB.id, SOURCE_HELP)
    revision: str = option(FINEWEB.revision, "hub revision")


@dataclass
class FineWebEduOptions(FineWebOptions):
    """Options of `prepare fineweb-edu`: the sample-10BT subset, ~10B GPT-2 tokens."""

    source: str = option(FINEWEB_EDU.id, SOURCE_HELP)


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
    return write_dataset(out, corpus, lambda: CharTokenizer.from_text(corpus_text(corpus)), opts)


@register("shakespeare", "tiny Shakespeare, GPT-2 BPE (nanoGPT's shakespeare)")
def prepare_shakespeare(opts: PrepareOptions) -> Meta:
    out, corpus = _tiny_shakespeare(opts, "shakespeare")
    return write_dataset(out, corpus, lambda: GPT2Tokenizer(mirror_dir(opts.mirror)), opts)


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

    def tokenizer() -> Tokenizer:
        if opts.tokenizer == "char":
            return CharTokenizer.from_text(corpus_text(corpus))
        if opts.tokenizer == "bpe":  # learned from the train split only, so val stays unseen text
            return BPETokenizer.train(corpus_text(corpus, "train"), opts.vocab_size or BPE_DEFAULT_VOCAB)
        return GPT2Tokenizer(mirror_dir(opts.mirror))

    return write_dataset(Path(opts.data_dir) / opts.name, corpus, tokenizer, opts, dtype=opts.dtype)


@register(
    "openwebtext",
    "OpenWebText (Hugging Face Skylion007/openwebtext), GPT-2 BPE: ~9B tokens",
    OpenWebTextOptions,
)
def prepare_openwebtext(opts: OpenWebTextOptions) -> Meta:
    return _prepare_hub(opts, OPENWEBTEXT, "openwebtext")


@register("fineweb", "FineWeb sample-10BT (HuggingFaceFW/fineweb), GPT-2 BPE: ~10B tokens", FineWebOptions)
def prepare_fineweb(opts: FineWebOptions) -> Meta:
    return _prepare_hub(opts, FINEWEB, "fineweb")


@register(
    "fineweb-edu",
    "FineWeb-Edu sample-10BT (HuggingFaceFW/fineweb-edu), GPT-2 BPE: ~10B tokens",
    FineWebEduOptions,
)
def prepare_fineweb_edu(opts: FineWebEduOptions) -> Meta:
    return _prepare_hub(opts, FINEWEB_EDU, "fineweb-edu")


def _prepare_hub(opts: OpenWebTextOptions, hub: HubDataset, name: str) -> Meta:
    """A hub dataset of documents (or its stand-in: the mirror's copy, --source), split like nanoGPT's
    openwebtext: a seeded shuffle of the documents, `val_fraction` of them for val."""
    mirror = mirror_dir(opts.mirror)
    source = opts.source
    if source == hub.id and mirror is not None and (mirror / hub.mirror_path).is_dir():
        source = str(mirror / hub.mirror_path)
    hub = dataclasses.replace(hub, revision=opts.revision)
    documents, origin = load_hf_dataset(source, hub, opts.cache_dir, opts.num_proc)
    if opts.text_field not in documents.column_names:
        raise GptforgeError(
            f"--source={opts.source} has no {opts.text_field!r} column (it has {documents.column_names}); "
            f"use --text_field"
        )
    parts = documents.train_test_split(test_size=opts.val_fraction, seed=opts.seed, shuffle=True)
    size = documents.data.column(opts.text_field).nbytes
    corpus = HFDocuments({"train": parts["train"], "val": parts["test"]}, opts.text_field, origin, size)
    return write_dataset(Path(opts.data_dir) / name, corpus, lambda: GPT2Tokenizer(mirror), opts)


# ------------------------------------------------------------------------------------------------------------
# Writing: check the output against the input, encode batches on `num_proc` processes, shard them in order.


def write_dataset(
    out: Path,
    corpus: Corpus,
    tokenizer: Tokenizer | Callable[[], Tokenizer],
    opts: PrepareOptions,
    dtype: str = "auto",
) -> Meta:
    """Encode `corpus` into out/ and write out/meta.json: resuming an unfinished prepare of the same input and
    options, returning at once when it is finished. `tokenizer` may be the function that makes it, called only
    when there is work to do and no earlier run made it (a resumed run rebuilds the one recorded)."""
    options = dataclasses.asdict(opts)
    identity = _identity(out.name, corpus.source(), options)
    with locked(out):
        progress = None if opts.overwrite else read_progress(out)
        if progress is not None and progress.get("chunk_bytes") != CHUNK_BYTES:
            print(f"{out}: the unfinished prepare was cut into other batches; starting over", file=sys.stderr)
            progress = None
        if progress is not None and progress["identity"] != identity:
            _refuse(out, "an unfinished prepare", progress["identity"], identity)
        if progress is None and (out / META_FILE).is_file() and not opts.overwrite:
            previous = _identity_of_meta(out / META_FILE)
            if previous == identity:
                print(
                    f"{out} is already prepared from this input: nothing to do (--overwrite does it again)",
                    file=sys.stderr,
                )
                return Meta.read(out)
            _refuse(out, "a dataset", previous, identity)
        if progress is None:
            remove_dataset(out)
            with _removed_on_error(out):
                progress = _start(out, tokenizer, dtype, identity)
        else:
            print(f"{out}: resuming the unfinished prepare ({PROGRESS_FILE})", file=sys.stderr)
        made = from_spec(progress["tokenizer"], out, mirror_dir(opts.mirror))
        writer = ShardWriter(out, progress, opts.shard_tokens)
        with _removed_on_error(out):
            try:
                batches = _encode_into(writer, corpus, _Encoder(made, progress["dtype"]), opts.num_proc)
                shards = writer.finish(batches)
            finally:
                writer.abort()  # the open shard, if any; after an interruption the finished ones stay
            tokens = {split: sum(s["tokens"] for s in writer.shards.get(split, [])) for split in SPLITS}
            for split, count in tokens.items():
                if count == 0:
                    raise GptforgeError(
                        f"the {split} split came out empty; give more text or change --val_fraction"
                    )
        meta = Meta(
            tokenizer=made.spec(),
            vocab_size=made.vocab_size,
            dtype=progress["dtype"],
            tokens=tokens,
            eot_token=made.eot_token,
            dataset=out.name,
            source=corpus.source(),
            options=options,
            shards=shards,
        )
        meta.write(out)
        (out / PROGRESS_FILE).unlink()
    return meta


@contextlib.contextmanager
def _removed_on_error(out: Path) -> Iterator[None]:
    """On bad input (a GptforgeError) remove what this prepare wrote: once the input is fixed it is another
    input, so the work cannot be resumed."""
    try:
        yield
    except GptforgeError:
        remove_dataset(out)
        (out / BPETokenizer.FILE).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            out.rmdir()  # if nothing else is in it
        raise


def _identity(dataset: str, source: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """What the bytes written depend on: the dataset, the content of its input (each file's sha256, not where
    it is) and the options that change the output."""
    where = ("inputs", "path", "url", "input")
    return {
        "dataset": dataset,
        "inputs": [record["sha256"] for record in source.get("inputs", [])],
        "source": {k: v for k, v in source.items() if k not in where},
        "options": {k: v for k, v in options.items() if k not in NOT_IN_OUTPUT},
    }


def _identity_of_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return _identity(meta.get("dataset", ""), meta.get("source", {}), meta.get("options", {}))


def _refuse(out: Path, what: str, previous: dict[str, Any], identity: dict[str, Any]) -> None:
    """The one-line error for an output directory that holds the work of other input or options."""
    old = previous.get("options", {})
    changed = [f"--{k}={old.get(k)} (not {v})" for k, v in identity["options"].items() if old.get(k) != v]
    if not old:
        reason = "whose input is not recorded"
    elif changed:
        reason = "prepared with " + ", ".join(changed)
    else:
        reason = "of other input" if previous.get("inputs") != identity["inputs"] else "of another source"
    raise GptforgeError(f"{out} holds {what} {reason}; pass --overwrite to start over, or another --data_dir")


def _start(
    out: Path, tokenizer: Tokenizer | Callable[[], Tokenizer], dtype: str, identity: dict[str, Any]
) -> dict[str, Any]:
    """Make the tokenizer, save what rebuilds it, and record the start of a prepare in progress.json."""
    made = tokenizer if isinstance(tokenizer, Tokenizer) else tokenizer()
    if isinstance(made, BPETokenizer):
        made.save(out / BPETokenizer.FILE)
    progress = {
        "identity": identity,
        "tokenizer": made.spec(),
        "dtype": token_dtype(made.vocab_size, dtype),
        "chunk_bytes": CHUNK_BYTES,
        "shards": {},
        "position": [0, 0],
    }
    save_progress(out, progress)
    return progress


class _Encoder:
    """Encodes a batch of (text, end_of_document) pieces to one array of ids, the end-of-text id after the
    last piece of each document. Picklable: each worker process gets a copy."""

    def __init__(self, tokenizer: Tokenizer, dtype: str):
        self.tokenizer, self.dtype = tokenizer, np.dtype(dtype).newbyteorder("<")
        self.eot = None if tokenizer.eot_token is None else np.array([tokenizer.eot_token], dtype=np.uint32)

    def __call__(self, pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, int]:
        """The ids, and the bytes of UTF-8 text they came from (what progress counts)."""
        ids = []
        for text, end_of_document in pieces:
            ids.append(self.tokenizer.encode_to_numpy(text))
            if end_of_document and self.eot is not None:
                ids.append(self.eot)
        return np.concatenate(ids).astype(self.dtype), _utf8_bytes(pieces)


def _utf8_bytes(pieces: list[tuple[str, bool]]) -> int:
    return sum(len(t) if t.isascii() else len(t.encode("utf-8", "surrogatepass")) for t, _ in pieces)


class _Batch(NamedTuple):
    index: int
    split: str
    pieces: list[tuple[str, bool]]


def _batched(chunks: Iterable[Chunk], max_chars: int) -> Iterator[_Batch]:
    """Chunks grouped into numbered batches of about `max_chars` and of one split each: the unit a worker
    encodes, and (by number) how far progress.json says the finished shards reach."""
    index, split, pieces, size = 0, None, [], 0
    for chunk in itertools.chain(chunks, [None]):
        if pieces and (chunk is None or chunk.split != split or size >= max_chars):
            yield _Batch(index, split, pieces)
            index, pieces, size = index + 1, [], 0
        if chunk is not None:
            split = chunk.split
            pieces.append((chunk.text, chunk.end_of_document))
            size += len(chunk.text)


def _encode_into(writer: ShardWriter, corpus: Corpus, encoder: _Encoder, num_proc: int) -> int:
    """Encode the batches the writer does not have yet and write them in order; returns the number of
    batches."""
    start, skip = writer.position
    batches = _batched(corpus.pieces(), CHUNK_BYTES)
    count = start
    with Progress("tokenize", corpus.size()) as progress:
        todo = []
        for batch in batches:  # read, not encoded: the finished shards hold them
            if batch.index >= start:
                todo.append(batch)
                break
            progress.skip(_utf8_bytes(batch.pieces))
        workers = num_proc if corpus.size() >= POOL_MIN_BYTES else 1
        for batch, (ids, nbytes) in ordered_map(encoder, itertools.chain(todo, batches), workers):
            writer.write(batch.index, batch.split, ids, skip if batch.index == start else 0)
            progress.update(nbytes, len(ids))
            count = batch.index + 1
    return count


# ------------------------------------------------------------------------------------------------------------
# Worker processes: a forkserver (one clean process that imported this module once) forks them.

# A smaller corpus is encoded in this process: that takes about as long as starting the workers.
POOL_MIN_BYTES = 16 << 20
_worker_encoder: _Encoder | None = None


def _start_worker(encoder: _Encoder) -> None:
    global _worker_encoder
    _worker_encoder = encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the main process, which stops the workers


def _encode_in_worker(pieces: list[tuple[str, bool]]) -> tuple[np.ndarray, int]:
    assert _worker_encoder is not None
    return _worker_encoder(pieces)


def ordered_map(
    encoder: _Encoder, batches: Iterable[_Batch], workers: int
) -> Iterator[tuple[_Batch, tuple[np.ndarray, int]]]:
    """Each batch with `encoder(batch.pieces)`, in order, on `workers` processes with at most 2 * workers
    batches in flight; the batches that come while the workers start are encoded here."""
    if workers <= 1:
        yield from ((batch, encoder(batch.pieces)) for batch in batches)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if "forkserver" in methods:
        context.set_forkserver_preload([__name__])
    with ProcessPoolExecutor(workers, context, initializer=_start_worker, initargs=(encoder,)) as pool:
        started = pool.submit(int)  # done once a worker is up
        pending: deque[tuple[_Batch, Future[tuple[np.ndarray, int]]]] = deque()
        try:
            for batch in batches:
                if started.done():
                    pending.append((batch, pool.submit(_encode_in_worker, batch.pieces)))
                else:
                    here: Future[tuple[np.ndarray, int]] = Future()
                    here.set_result(encoder(batch.pieces))
                    pending.append((batch, here))
                while pending and (len(pending) >= 2 * workers or pending[0][1].done()):
                    batch, future = pending.popleft()
                    yield batch, future.result()
            while pending:
                batch, future = pending.popleft()
                yield batch, future.result()
        finally:
            for _, future in pending:
                future.cancel()
