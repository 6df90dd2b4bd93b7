"""Tests for gptforge.data.prepare (`gptforge prepare`): nanoGPT byte-identity, splits, the registry and the
writer, and bad input.

    .venv/bin/python -m pytest tests/test_data_prepare.py

The nanoGPT references below are that project's prepare.py scripts reduced to the lines that decide their
output, run on the mirror's files with tiktoken's own `get_encoding("gpt2")`.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from mirror_data import MIRROR, SHAKESPEARE, needs_mirror, reference_gpt2

from gptforge.cli import main
from gptforge.data import Meta
from gptforge.data import prepare as data_prepare
from gptforge.data.corpus import Chunk, SplitText
from gptforge.data.prepare import PrepareOptions, register, write_dataset
from gptforge.tokenizer import BPETokenizer, CharTokenizer, GPT2Tokenizer

TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
SHAKESPEARE_CHARS = "\n !$&',-.3:;?" + "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "abcdefghijklmnopqrstuvwxyz"


def prepare(*args: str) -> int:
    return main(["prepare", *args])


def bins(directory: Path) -> tuple[bytes, bytes]:
    return (directory / "train.bin").read_bytes(), (directory / "val.bin").read_bytes()


@functools.cache
def nanogpt_shakespeare_char() -> tuple[bytes, bytes]:
    """nanoGPT's data/shakespeare_char/prepare.py."""
    with open(SHAKESPEARE) as f:
        data = f.read()
    chars = sorted(list(set(data)))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(data)
    train_ids = [stoi[c] for c in data[: int(n * 0.9)]]
    val_ids = [stoi[c] for c in data[int(n * 0.9) :]]
    return np.array(train_ids, dtype=np.uint16).tobytes(), np.array(val_ids, dtype=np.uint16).tobytes()


@functools.cache
def nanogpt_shakespeare() -> tuple[bytes, bytes]:
    """nanoGPT's data/shakespeare/prepare.py."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        data = f.read()
    n = len(data)
    enc = reference_gpt2()
    train_ids = enc.encode_ordinary(data[: int(n * 0.9)])
    val_ids = enc.encode_ordinary(data[int(n * 0.9) :])
    return np.array(train_ids, dtype=np.uint16).tobytes(), np.array(val_ids, dtype=np.uint16).tobytes()


def nanogpt_openwebtext(data_files: list[str], cache_dir: Path, test_size: float) -> tuple[bytes, bytes]:
    """nanoGPT's data/openwebtext/prepare.py, loading local files instead of the hub's."""
    from datasets import load_dataset

    enc = reference_gpt2()
    dataset = load_dataset("json", data_files=data_files, cache_dir=str(cache_dir))
    split_dataset = dataset["train"].train_test_split(test_size=test_size, seed=2357, shuffle=True)
    split_dataset["val"] = split_dataset.pop("test")

    def process(example):
        ids = enc.encode_ordinary(example["text"])
        ids.append(enc.eot_token)
        return {"ids": ids, "len": len(ids)}

    tokenized = split_dataset.map(process, remove_columns=["text"])
    # prepare.py concatenates contiguous shards in order: the documents' ids, one after another
    train, val = (
        np.concatenate([np.array(ids, dtype=np.uint16) for ids in tokenized[s]["ids"]])
        for s in ("train", "val")
    )
    return train.tobytes(), val.tobytes()


@pytest.fixture(scope="module")
def gpt2() -> GPT2Tokenizer:
    return GPT2Tokenizer(MIRROR)


# ---- nanoGPT's datasets, byte for byte


@needs_mirror
def test_shakespeare_char_is_byte_identical_to_nanogpt(tmp_path):
    assert prepare("shakespeare_char", f"--data_dir={tmp_path}", f"--mirror={MIRROR}") == 0
    out = tmp_path / "shakespeare_char"
    assert bins(out) == nanogpt_shakespeare_char()
    meta = Meta.read(out)
    assert meta.tokens == {"train": 1_003_854, "val": 111_540}
    assert meta.vocab_size == 65 and meta.dtype == "uint16" and meta.eot_token is None
    assert meta.tokenizer == {"kind": "char", "chars": SHAKESPEARE_CHARS}
    assert meta.source["inputs"][0]["sha256"] == TINY_SHAKESPEARE_SHA256
    assert not (out / "input.txt").exists()  # read from the mirror, not copied out of it


@needs_mirror
def test_shakespeare_is_byte_identical_to_nanogpt_through_the_command_line(tmp_path):
    env = {**os.environ, "GPTFORGE_DATA_MIRROR": str(MIRROR)}  # the mirror named by the environment this time
    result = subprocess.run(
        [sys.executable, "-m", "gptforge", "prepare", "shakespeare", f"--data_dir={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "shakespeare: train 301,966, val 36,059 tokens (gpt2, vocab 50,257, uint16)\n"
    assert bins(tmp_path / "shakespeare") == nanogpt_shakespeare()
    meta = Meta.read(tmp_path / "shakespeare")
    assert meta.tokenizer["kind"] == "gpt2" and meta.vocab_size == 50257 and meta.eot_token == 50256
    assert np.memmap(tmp_path / "shakespeare" / "val.bin", dtype=np.uint16, mode="r").shape == (36_059,)


@needs_mirror
@pytest.mark.parametrize(
    ("tokenizer", "reference"), [("char", nanogpt_shakespeare_char), ("gpt2", nanogpt_shakespeare)]
)
def test_text_of_one_file_splits_by_characters_like_nanogpt(tmp_path, tokenizer, reference):
    args = [
        f"--input={SHAKESPEARE}",
        f"--tokenizer={tokenizer}",
        f"--data_dir={tmp_path}",
        f"--mirror={MIRROR}",
    ]
    assert prepare("text", *args) == 0
    assert bins(tmp_path / "text") == reference()


# ---- your own text


@pytest.fixture
def documents(tmp_path) -> tuple[Path, list[str]]:
    """A directory of .txt files and a .jsonl, and its documents in input order."""
    directory = tmp_path / "docs"
    directory.mkdir()
    records = ["record one", "", "record <|endoftext|> three", "ünïcödé record\n", "record five " * 50]
    texts = {
        "a.txt": "Alpha document.\nIt has two lines.\n",
        "b.txt": "Beta: “quoted”\r\n",
        "d.txt": "Delta.",
    }
    for name, text in texts.items():
        (directory / name).write_bytes(text.encode())
    (directory / "c.jsonl").write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(records))
    )
    (directory / "ignored.bin").write_bytes(b"\xff\xfe")  # not .txt or .jsonl: skipped
    return directory, [texts["a.txt"], texts["b.txt"], *records, texts["d.txt"]]


def split_documents(directory: Path, split: str, tokenizer: GPT2Tokenizer | BPETokenizer) -> list[str]:
    """The documents of a .bin file, each ended by the tokenizer's end-of-text id."""
    ids = np.fromfile(directory / f"{split}.bin", dtype=np.uint16)
    ends = np.flatnonzero(ids == tokenizer.eot_token)
    assert ends[-1] == len(ids) - 1
    return [tokenizer.decode(ids[start:end]) for start, end in zip([0, *(ends[:-1] + 1)], ends, strict=True)]


@needs_mirror
def test_documents_split_by_document_in_input_order(tmp_path, documents, gpt2):
    directory, docs = documents
    args = [f"--input={directory}", "--val_fraction=0.25", f"--data_dir={tmp_path}", f"--mirror={MIRROR}"]
    assert prepare("text", *args) == 0
    out = tmp_path / "text"
    train, val = split_documents(out, "train", gpt2), split_documents(out, "val", gpt2)
    assert len(val) == 2 and sorted(train + val) == sorted(docs)
    for part in (train, val):  # each split keeps the input order
        positions = [docs.index(d) for d in part]
        assert positions == sorted(positions)
    meta = Meta.read(out)
    assert len(meta.source["inputs"]) == 4 and meta.source["documents"] == 8
    assert prepare("text", *args, "--name=again") == 0
    assert bins(tmp_path / "again") == bins(out)  # deterministic
    assert prepare("text", *args, "--name=reseeded", "--seed=1") == 0
    assert split_documents(tmp_path / "reseeded", "val", gpt2) != val


@needs_mirror
def test_bpe_separates_documents_with_its_end_of_text_id(tmp_path, documents):
    directory, docs = documents
    args = [f"--input={directory}", "--tokenizer=bpe", "--vocab_size=300", "--val_fraction=0.25"]
    assert prepare("text", *args, f"--data_dir={tmp_path}") == 0
    out = tmp_path / "text"
    tokenizer = Meta.read(out).load_tokenizer(out)
    assert tokenizer.eot_token == 0  # and "<|endoftext|>" inside a record stays text, not a separator
    train, val = split_documents(out, "train", tokenizer), split_documents(out, "val", tokenizer)
    assert len(val) == 2 and sorted(train + val) == sorted(docs)


def test_char_documents_are_concatenated_without_a_separator(tmp_path, documents):
    directory, docs = documents
    args = [f"--input={directory}", "--tokenizer=char", "--val_fraction=0.25", f"--data_dir={tmp_path}"]
    assert prepare("text", *args) == 0
    meta = Meta.read(tmp_path / "text")
    assert meta.eot_token is None and sum(meta.tokens.values()) == sum(map(len, docs))  # one id per character


@needs_mirror
def test_inputs_from_lists_and_globs(tmp_path, documents, gpt2):
    directory, docs = documents
    spec = f"{directory}/a.txt, {directory}/*.jsonl"
    assert (
        prepare(
            "text", f"--input={spec}", "--val_fraction=0.2", f"--data_dir={tmp_path}", f"--mirror={MIRROR}"
        )
        == 0
    )
    out = tmp_path / "text"
    assert sorted(split_documents(out, "train", gpt2) + split_documents(out, "val", gpt2)) == sorted(
        [docs[0], *docs[2:7]]
    )
    assert Meta.read(out).source["input"] == spec


@needs_mirror
def test_bpe_is_trained_saved_and_reloaded(tmp_path):
    args = [f"--input={SHAKESPEARE}", "--tokenizer=bpe", "--vocab_size=400", f"--data_dir={tmp_path}"]
    assert prepare("text", *args) == 0
    out = tmp_path / "text"
    meta = Meta.read(out)
    assert meta.vocab_size == 400 and meta.eot_token == 0 and meta.tokenizer["file"] == "tokenizer.json"
    tokenizer = meta.load_tokenizer(out)
    train, val = (np.fromfile(out / f"{s}.bin", dtype=np.uint16) for s in ("train", "val"))
    assert tokenizer.decode(train) + tokenizer.decode(val) == SHAKESPEARE.read_text(encoding="utf-8")
    assert 0 < len(val) < len(train) / 5


def test_errors_replace_keeps_going(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world, hello again")
    assert (
        prepare(
            "text",
            f"--input={tmp_path}/bad.txt",
            "--tokenizer=char",
            "--errors=replace",
            f"--data_dir={tmp_path}",
        )
        == 0
    )
    assert "\ufffd" in Meta.read(tmp_path / "text").tokenizer["chars"]
    (tmp_path / "lone.jsonl").write_text('{"text": "a lone \\udc00"}\n{"text": "a pair \\ud83d\\ude00"}\n')
    args = [f"--input={tmp_path}/lone.jsonl", "--tokenizer=char", "--errors=replace", "--name=lone"]
    assert prepare("text", *args, f"--data_dir={tmp_path}") == 0
    assert Meta.read(tmp_path / "lone").tokenizer["chars"] == " aeilnopr\ufffd😀"


# ---- openwebtext, on a small local stand-in


@pytest.fixture(scope="module")
def web_documents(tmp_path_factory) -> tuple[Path, list[str]]:
    directory = tmp_path_factory.mktemp("owt")
    docs = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p][:400]
    docs += ["", "<|endoftext|> inside a document", "naïve café ✓ 😀", "x" * 5000]
    (directory / "owt.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return directory, docs


@needs_mirror
def test_openwebtext_is_byte_identical_to_nanogpt(tmp_path, web_documents):
    directory, docs = web_documents
    reference = nanogpt_openwebtext([str(directory / "owt.jsonl")], tmp_path / "hf-reference", test_size=0.05)
    common = [
        "--val_fraction=0.05",
        f"--cache_dir={tmp_path}/hf",
        f"--mirror={MIRROR}",
        f"--data_dir={tmp_path}",
    ]
    assert prepare("openwebtext", f"--source={directory}/owt.jsonl", *common) == 0
    out = tmp_path / "openwebtext"
    assert bins(out) == reference
    meta = Meta.read(out)
    assert meta.source["documents"] == {"train": 383, "val": 21} and len(docs) == 404
    assert meta.tokens["val"] == len(reference[1]) // 2


@needs_mirror
def test_openwebtext_from_parquet_or_a_saved_dataset(tmp_path, web_documents):
    import datasets

    directory, docs = web_documents
    datasets.Dataset.from_dict({"text": docs}).to_parquet(tmp_path / "owt.parquet")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(tmp_path / "saved")
    common = ["--val_fraction=0.05", f"--cache_dir={tmp_path}/hf", f"--mirror={MIRROR}"]
    outputs = []
    for i, source in enumerate((directory / "owt.jsonl", tmp_path / "owt.parquet", tmp_path / "saved")):
        assert prepare("openwebtext", f"--source={source}", *common, f"--data_dir={tmp_path}/out{i}") == 0
        outputs.append(bins(tmp_path / f"out{i}" / "openwebtext"))
    assert outputs[0] == outputs[1] == outputs[2]


@needs_mirror
def test_openwebtext_from_text_files_one_document_each(tmp_path, gpt2):
    (tmp_path / "web").mkdir()
    docs = [f"Page {i}.\nIts second line is {'long ' * i}and ends here.\n" for i in range(20)]
    for i, doc in enumerate(docs):
        (tmp_path / "web" / f"{i:02}.txt").write_text(doc)
    common = [
        "--val_fraction=0.1",
        f"--cache_dir={tmp_path}/hf",
        f"--mirror={MIRROR}",
        f"--data_dir={tmp_path}",
    ]
    assert prepare("openwebtext", f"--source={tmp_path}/web", *common) == 0
    out = tmp_path / "openwebtext"
    train, val = split_documents(out, "train", gpt2), split_documents(out, "val", gpt2)
    assert len(val) == 2 and sorted(train + val) == sorted(docs)


# ---- the registry and the shared writer


def test_a_new_dataset_is_one_registered_function(tmp_path, capsys, monkeypatch):
    # the real registry stays as it was
    monkeypatch.setattr(data_prepare, "DATASETS", dict(data_prepare.DATASETS))
    (tmp_path / "letters.txt").write_text("abc " * 100)

    @register("letters", "a toy corpus of four characters")
    def prepare_letters(opts: PrepareOptions) -> Meta:
        corpus = SplitText(tmp_path / "letters.txt", opts.val_fraction)
        return write_dataset(Path(opts.data_dir) / "letters", corpus, CharTokenizer("abc "), opts)

    assert prepare("--help") == 0 and "letters           a toy corpus" in capsys.readouterr().out
    assert prepare("letters", f"--data_dir={tmp_path}", "--num_proc=1") == 0
    assert capsys.readouterr().out == "letters: train 360, val 40 tokens (char, vocab 4, uint16)\n"
    assert Meta.read(tmp_path / "letters").dataset == "letters"


def test_prepare_streams_in_constant_memory(tmp_path, monkeypatch):
    """Only a few pieces are ever read ahead of what is written, however long the corpus."""
    monkeypatch.setattr(data_prepare, "CHUNK_BYTES", 4096)  # pieces are batched by this many characters
    monkeypatch.setattr(data_prepare, "POOL_MIN_BYTES", 0)  # and encoded on worker processes
    out, piece = tmp_path / "out", "ab " * 341 + "\n"  # 1,024 characters
    lag = []

    class Endless:
        def pieces(self):
            for i in range(2000):
                # one token per character, written as uint16 to the shards and the partial one
                written = sum(p.stat().st_size for p in out.glob("*.bin*")) // 2
                lag.append(i * len(piece) - written)
                yield Chunk("val" if i >= 1800 else "train", piece, False)

        def size(self) -> int:
            return 2000 * len(piece)

        def source(self) -> dict:
            return {}

    opts = PrepareOptions(num_proc=2, shard_tokens=100_000)
    meta = write_dataset(out, Endless(), CharTokenizer(" \nab"), opts)
    assert sum(meta.tokens.values()) == 2000 * len(piece)
    assert max(lag) <= 16 * 4096  # a few batches in flight, out of 2 MB of text


def test_prepare_and_its_workers_never_import_torch():
    """The workers are forked from a process that imported prepare.py alone: without torch (~1.5 CPU s and
    ~180 MB each), and so is `gptforge prepare` itself."""
    check = ("import sys; from gptforge.cli import main; import gptforge.data.prepare; "
             "main(['prepare', '--help']); assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", check], check=True, capture_output=True)


# ---- bad input: one line, exit status 2, nothing written


@pytest.fixture
def bad_inputs(tmp_path) -> Path:
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "tiny.txt").write_bytes(b"a")
    (tmp_path / "ok.txt").write_text("to be or not to be\n" * 10)
    (tmp_path / "bad.txt").write_bytes(b"hello \xff world")
    (tmp_path / "no_field.jsonl").write_text('{"text": "a"}\n{"body": "b"}\n')
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    (tmp_path / "one.jsonl").write_text('{"text": "only one"}\n\n')
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b\xff"}\n')
    (tmp_path / "nothing").mkdir()
    (tmp_path / "surrogate.jsonl").write_text(
        '{"text": "a \\ud83d\\ude00 pair"}\n{"text": "a lone \\udc00"}\n'
    )
    return tmp_path


BAD = [
    (["shakespear"],
     "unknown dataset 'shakespear'; known datasets: shakespeare_char, shakespeare, text, openwebtext"),
    ([], "name one dataset: gptforge prepare NAME"),
    (["text"], "prepare text needs --input=PATH[,PATH...]"),
    (["text", "--input={tmp}/nope.txt"], "--input: {tmp}/nope.txt does not exist"),
    (["text", "--input={tmp}/empty.txt"], "{tmp}/empty.txt is empty"),
    (["text", "--input={tmp}/tiny.txt"],
     "{tmp}/tiny.txt has 1 characters, too few to split with --val_fraction"),
    (["text", "--input={tmp}/bad.txt"],
     "{tmp}/bad.txt: invalid UTF-8 at byte 6; fix the file or pass --errors=replace"),
    (["text", "--input={tmp}/no_field.jsonl"],
     "{tmp}/no_field.jsonl:2: no string field 'text'; name it with --text_field"),
    (["text", "--input={tmp}/broken.jsonl"], "{tmp}/broken.jsonl:2: not valid JSON"),
    (["text", "--input={tmp}/one.jsonl"], "holds 1 document(s); splitting by document needs at least 2"),
    (["text", "--input={tmp}/bad.jsonl"],
     "{tmp}/bad.jsonl: invalid UTF-8 at byte 25 (line 2); fix the file or pass --errors=replace"),
    (["text", "--input={tmp}/nothing"], "--input: {tmp}/nothing matches no .txt or .jsonl files"),
    (["text", "--input={tmp}/surrogate.jsonl"],
     "{tmp}/surrogate.jsonl:2: 'text' holds a lone surrogate '\\udc00', not valid Unicode"),
    (["text", "--input={tmp}/ok.txt", "--val_fractoin=0.2"],
     "unknown option --val_fractoin (did you mean --val_fraction?)"),
    (["text", "--input={tmp}/ok.txt", "--val_fraction=1.5"], "--val_fraction=1.5 must be between 0 and 1"),
    (["text", "--input={tmp}/ok.txt", "--vocab_size=500"], "--vocab_size applies to --tokenizer=bpe only"),
    (["text", "--input={tmp}/ok.txt", "--tokenizer=bpe", "--vocab_size=70000", "--dtype=uint16"],
     "vocab_size 70000 does not fit uint16; use --dtype=uint32"),
    (["text", "--input={tmp}/ok.txt", "--tokenizer=wordpiece"],
     "--tokenizer='wordpiece' is not one of 'char', 'gpt2', 'bpe'"),
    (["text", "--input={tmp}/ok.txt", "--name=../up"], "--name='../up' must be a plain directory name"),
    (["openwebtext", "--source={tmp}/ok.txt", "--text_field=body"], "has no 'body' column"),
]  # fmt: skip


@pytest.mark.parametrize(("args", "message"), BAD)
def test_bad_input_is_a_one_line_error(bad_inputs, capsys, args, message):
    tmp = bad_inputs
    args = [a.format(tmp=tmp) for a in args]
    assert prepare(*args, f"--data_dir={tmp}/data", f"--mirror={MIRROR}", "--num_proc=1") == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("gptforge prepare: error: ") and message.format(tmp=tmp) in error
    assert not list((tmp / "data").rglob("*.bin"))


def test_help_lists_datasets_and_options(capsys):
    assert prepare("--help") == 0
    assert "shakespeare_char" in capsys.readouterr().out
    assert prepare("text", "--help") == 0
    assert "--input=" in capsys.readouterr().out


@needs_mirror
def test_a_failed_prepare_leaves_the_previous_dataset_whole(tmp_path):
    (tmp_path / "docs").mkdir()
    for name in "abc":
        (tmp_path / "docs" / f"{name}.txt").write_text(f"document {name}\n" * 1000)
    args = [f"--input={tmp_path}/docs", f"--data_dir={tmp_path}", f"--mirror={MIRROR}", "--val_fraction=0.3"]
    assert prepare("text", *args) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "text").iterdir()}
    (tmp_path / "docs" / "z.txt").write_bytes(b"fine until \xff")  # fails after a, b and c are written
    assert prepare("text", *args) == 2
    assert {p.name: p.read_bytes() for p in (tmp_path / "text").iterdir()} == before  # and no temporaries


# With the network cut in the child process, so the test means the same on a machine that is online.
OFFLINE = """import socket, sys
def offline(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.getaddrinfo = socket.socket.connect = offline
from gptforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["shakespeare_char"],
            "cannot download "
            "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        ),
        (
            ["text", "--input={tmp}/a.txt"],
            "cannot get the GPT-2 BPE files (https://openaipublic.blob.core.windows.net",
        ),
        (
            ["openwebtext"],
            "cannot load Skylion007/openwebtext (revision cf22a3730519fbb9629cd35ddf1669bbfe9e2b97)",
        ),
    ],
)
def test_offline_without_a_mirror_names_the_url_and_the_option(tmp_path, args, message):
    (tmp_path / "a.txt").write_text("some text to tokenize\n" * 10)
    env = {
        **os.environ,
        "GPTFORGE_DATA_MIRROR": "",
        "TIKTOKEN_CACHE_DIR": str(tmp_path),
        "HF_HUB_OFFLINE": "1",
    }
    env["HF_HOME"] = str(tmp_path / "hf")
    command = [
        sys.executable,
        "-c",
        OFFLINE,
        "prepare",
        *(a.format(tmp=tmp_path) for a in args),
        f"--data_dir={tmp_path}",
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("gptforge prepare: error: ") and message in error
    assert "--mirror=DIR or set GPTFORGE_DATA_MIRROR=DIR" in error
