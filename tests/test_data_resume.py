"""Tests for gptforge.data.shards (the resumable writer) through `gptforge prepare`: shards, resuming after
`kill -9` at every kind of moment into the same bytes with nothing left behind, the input check, worker
processes, FineWeb from local files, and the progress lines.

    .venv/bin/python -m pytest tests/test_data_resume.py

The references are an uninterrupted run (itself checked against nanoGPT's scripts in test_data_prepare.py)
and tiktoken's own GPT-2 encoding.
"""

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mirror_data import MIRROR, SHAKESPEARE, needs_mirror, reference_gpt2

from gptforge.cli import main
from gptforge.data import Meta
from gptforge.data import prepare as data_prepare
from gptforge.data.progress import Progress
from gptforge.data.shards import PROGRESS_FILE, locked

BATCH = 8192  # characters per encoded batch in these tests, so a small corpus makes many batches


def prepare(*args: str) -> int:
    return main(["prepare", *args])


def files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def split_tokens(directory: Path, split: str) -> np.ndarray:
    """A split's tokens, read the way the format says: its shards in order, or the one {split}.bin."""
    meta = Meta.read(directory)
    return np.concatenate(
        [np.fromfile(directory / name, dtype=meta.dtype) for name, _ in meta.shard_files(split)]
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """Forty documents of Shakespeare's paragraphs, as .txt files."""
    directory = tmp_path_factory.mktemp("docs")
    paragraphs = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p]
    for i in range(40):
        (directory / f"{i:02}.txt").write_text("\n\n".join(paragraphs[i * 20 : (i + 1) * 20]) + "\n")
    return directory


@pytest.fixture
def small_batches(monkeypatch):
    monkeypatch.setattr(data_prepare, "CHUNK_BYTES", BATCH)


@pytest.fixture(scope="module")
def whole(corpus, tmp_path_factory) -> Path:
    """The corpus prepared by an uninterrupted run: the reference of the resumed ones."""
    out = tmp_path_factory.mktemp("whole")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data_prepare, "CHUNK_BYTES", BATCH)
        assert prepare(*text_args(corpus, out)) == 0
    return out / "text"


@pytest.fixture
def own_corpus(corpus, tmp_path) -> Path:
    """A copy of the corpus that a test may change."""
    return Path(shutil.copytree(corpus, tmp_path / "docs"))


def text_args(corpus: Path, data_dir: Path, *more: str) -> list[str]:
    return [
        "text",
        f"--input={corpus}/*.txt",
        "--val_fraction=0.2",
        f"--data_dir={data_dir}",
        f"--mirror={MIRROR}",
        "--shard_tokens=3000",
        "--num_proc=1",
        *more,
    ]


# ---- shards


@needs_mirror
def test_shards_hold_the_tokens_of_one_file_each_recorded_with_its_sha256(
    tmp_path, corpus, whole, small_batches
):
    assert prepare(*text_args(corpus, tmp_path / "one", "--shard_tokens=100000000")) == 0
    one, many = tmp_path / "one" / "text", whole
    assert sorted(p.name for p in one.iterdir()) == ["meta.json", "train.bin", "val.bin"]
    meta = Meta.read(many)
    assert meta.tokens == Meta.read(one).tokens and meta.shards["train"][0]["file"] == "train_000000.bin"
    for split in ("train", "val"):
        assert split_tokens(many, split).tobytes() == (one / f"{split}.bin").read_bytes()
        shards = meta.shards[split]
        assert [s["tokens"] for s in shards[:-1]] == [3000] * (len(shards) - 1) and 0 < shards[-1][
            "tokens"
        ] <= 3000
        for shard in shards:
            assert hashlib.sha256((many / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    names = {p.name for p in many.iterdir()}
    assert names == {"meta.json", *(s["file"] for split in meta.shards.values() for s in split)}


@needs_mirror
def test_documents_end_with_the_end_of_text_id_across_shards(corpus, whole):
    out = whole
    enc = reference_gpt2()
    documents = {p.read_text(encoding="utf-8") for p in corpus.iterdir()}
    for split in ("train", "val"):
        ids = split_tokens(out, split).tolist()
        ends = [i for i, t in enumerate(ids) if t == enc.eot_token]
        decoded = [enc.decode(ids[a + 1 : b]) for a, b in zip([-1, *ends[:-1]], ends, strict=True)]
        assert ends[-1] == len(ids) - 1 and set(decoded) <= documents
        assert [enc.encode_ordinary(d) for d in decoded] == [
            ids[a + 1 : b] for a, b in zip([-1, *ends[:-1]], ends, strict=True)
        ]


@needs_mirror
def test_worker_processes_write_the_same_bytes_as_one(tmp_path, corpus, whole, small_batches, monkeypatch):
    monkeypatch.setattr(data_prepare, "POOL_MIN_BYTES", 0)  # workers, however small the corpus
    assert prepare(*text_args(corpus, tmp_path), "--num_proc=2") == 0
    two = files(tmp_path / "text")
    assert two.keys() == files(whole).keys()
    assert all(two[name] == data for name, data in files(whole).items() if name != "meta.json")


# ---- kill -9 at any moment, then the same command again


# Runs `gptforge prepare` and kills itself with SIGKILL at the K-th time it reaches POINT.
KILLER = """import os, signal, sys
from gptforge import atomic
from gptforge.cli import main
from gptforge.data import files, prepare, shards

point, k = sys.argv[1], int(sys.argv[2])
prepare.CHUNK_BYTES = int(sys.argv[3])
calls = 0

def die_at(owner, name, before=True, action=None):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        global calls
        calls += 1
        if calls == k and before:
            action and action(*args)
            os.kill(os.getpid(), signal.SIGKILL)
        result = original(*args, **kwargs)
        if calls == k:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    setattr(owner, name, wrapper)

def half_written_temporary(path, text):
    path = atomic.Path(path)
    path.with_name(f".{path.name}.tmp-{os.getpid()}").write_text(text[: len(text) // 2])

if point == "mid-shard":  # after the K-th batch is appended, most likely inside a shard
    die_at(shards.ShardWriter, "write", before=False)
elif point == "renamed":  # a shard fsynced and renamed, not yet recorded
    die_at(shards, "save_progress")
elif point == "progress-temporary":  # progress.json's temporary half written
    die_at(shards, "atomic_write_text", action=half_written_temporary)
elif point == "recorded":  # just after a shard is recorded
    die_at(shards, "save_progress", before=False)
elif point == "before-meta":  # every shard renamed into its final name, meta.json not written
    die_at(files.Meta, "write")
sys.exit(main(sys.argv[4:]))
"""


@needs_mirror
@pytest.mark.parametrize(
    ("point", "k"),
    [("mid-shard", 7), ("renamed", 3), ("progress-temporary", 5), ("recorded", 4), ("before-meta", 1)],
)
def test_a_killed_prepare_resumes_into_the_same_bytes(tmp_path, corpus, whole, small_batches, point, k):
    reference = files(whole)
    args = text_args(corpus, tmp_path / "killed")
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, point, str(k), str(BATCH), "prepare", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    out = tmp_path / "killed" / "text"
    assert not (out / "meta.json").exists()  # what it left reads as unfinished
    progress = json.loads((out / PROGRESS_FILE).read_text())
    assert progress["shards"] or point == "progress-temporary"
    assert prepare(*args) == 0
    again = files(out)
    assert again.keys() == reference.keys()  # no partial shard, no temporary, no progress.json
    assert all(again[name] == data for name, data in reference.items() if name != "meta.json")
    assert json.loads(again["meta.json"])["tokens"] == json.loads(reference["meta.json"])["tokens"]


@pytest.mark.slow
@needs_mirror
@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGINT])
def test_a_prepare_on_two_processes_stopped_then_resumed(tmp_path, corpus, whole, small_batches, stop):
    """A real kill -9 or Ctrl-C at an arbitrary moment: once two shards are recorded, with workers running."""
    args = text_args(corpus, tmp_path / "killed", "--num_proc=2", "--shard_tokens=1000")
    out = tmp_path / "killed" / "text"
    code = (
        f"import sys; from gptforge.data import prepare; prepare.CHUNK_BYTES = {BATCH}; "
        "prepare.POOL_MIN_BYTES = 0; from gptforge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    child = subprocess.Popen([sys.executable, "-c", code, "prepare", *args], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and child.poll() is None:
            try:
                if len(json.loads((out / PROGRESS_FILE).read_text())["shards"].get("train", [])) >= 2:
                    break
            except (FileNotFoundError, json.JSONDecodeError):
                pass
            time.sleep(0.005)
        assert child.poll() is None, "finished before it could be stopped"
        child.send_signal(stop)
    finally:
        child.wait()
    if stop == signal.SIGINT:  # Ctrl-C: the open shard removed at once, the recorded ones kept
        assert child.returncode == 130
        assert not list(out.glob("*.partial")) and (out / PROGRESS_FILE).is_file()
    assert prepare(*args) == 0
    assert split_tokens(out, "train").tobytes() == split_tokens(whole, "train").tobytes()
    assert not [p for p in out.iterdir() if p.name.endswith(".partial") or p.name.startswith(".")]


# ---- the input check


@needs_mirror
def test_the_same_input_is_done_and_changed_input_is_refused(
    tmp_path, own_corpus, whole, small_batches, capsys
):
    corpus = own_corpus
    args = text_args(corpus, tmp_path)
    assert prepare(*args) == 0
    out = tmp_path / "text"
    before = files(out)
    meta = Meta.read(out)
    assert [Path(i["path"]).name for i in meta.source["inputs"]] == [f"{i:02}.txt" for i in range(40)]
    assert all(len(i["sha256"]) == 64 for i in meta.source["inputs"])
    assert meta.tokenizer["kind"] == "gpt2"
    capsys.readouterr()
    assert prepare(*args, "--num_proc=2") == 0  # how the work is done is not part of the input
    assert "is already prepared from this input: nothing to do" in capsys.readouterr().err
    assert files(out) == before

    (corpus / "07.txt").write_text("a changed document\n")
    assert prepare(*args) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == (
        f"gptforge prepare: error: {out} holds a dataset of other input; pass --overwrite to start "
        "over, or another --data_dir"
    )
    assert prepare(*args, "--val_fraction=0.3") == 2
    assert "holds a dataset prepared with --val_fraction=0.2 (not 0.3)" in capsys.readouterr().err
    assert files(out) == before
    assert prepare(*args, "--overwrite") == 0
    assert Meta.read(out).source["inputs"][7]["sha256"] == hashlib.sha256(b"a changed document\n").hexdigest()
    assert split_tokens(out, "train").tobytes() + split_tokens(out, "val").tobytes() != (
        split_tokens(whole, "train").tobytes() + split_tokens(whole, "val").tobytes()
    )


@needs_mirror
def test_an_unfinished_prepare_of_changed_input_is_refused(tmp_path, own_corpus, small_batches, capsys):
    corpus = own_corpus
    args = text_args(corpus, tmp_path)
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, "recorded", "2", str(BATCH), "prepare", *args],
        capture_output=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL
    (corpus / "00.txt").write_text("changed\n")
    assert prepare(*args) == 2
    assert "holds an unfinished prepare of other input; pass --overwrite" in capsys.readouterr().err
    assert prepare(*args, "--overwrite") == 0 and not (tmp_path / "text" / PROGRESS_FILE).exists()


def test_bad_input_found_midway_leaves_nothing(tmp_path, small_batches):
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"{i:02}.txt").write_text("words and more words\n" * 200)
    (tmp_path / "docs" / "29.txt").write_bytes(b"fine until \xff")
    args = [f"--input={tmp_path}/docs", "--tokenizer=char", "--shard_tokens=500", "--num_proc=1"]
    assert prepare("text", *args, f"--data_dir={tmp_path}/data") == 2
    assert not (tmp_path / "data" / "text").exists()


def test_a_second_prepare_of_the_same_directory_waits_its_turn(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text " * 100)
    with locked(tmp_path / "data" / "text"):
        assert (
            prepare("text", f"--input={tmp_path}/a.txt", "--tokenizer=char", f"--data_dir={tmp_path}/data")
            == 2
        )
    assert "another gptforge prepare is writing" in capsys.readouterr().err


# ---- FineWeb (and any hub dataset of documents) from local files


@pytest.fixture(scope="module")
def web(tmp_path_factory) -> tuple[Path, list[str]]:
    pytest.importorskip("datasets", reason="prepare fineweb reads its files with Hugging Face datasets")
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = tmp_path_factory.mktemp("fineweb")
    docs = [p for p in SHAKESPEARE.read_text(encoding="utf-8").split("\n\n") if p][:300]
    docs += ["naïve ✓ 😀", ""]
    for i in range(3):  # three files, like the hub's parquet shards, with FineWeb's other columns
        part = docs[i * 101 : (i + 1) * 101]
        table = pa.table(
            {
                "text": part,
                "id": [f"doc-{i}-{j}" for j in range(len(part))],
                "token_count": [len(d) for d in part],
            }
        )
        pq.write_table(table, directory / f"{i:03}_00000.parquet")
        (directory / f"{i:03}_00000.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in part))
    return directory, docs


@needs_mirror
def test_fineweb_from_local_parquet_and_jsonl_is_nanogpts_openwebtext_recipe(tmp_path, web):
    from test_data_prepare import nanogpt_openwebtext

    directory, _ = web
    reference = nanogpt_openwebtext(sorted(str(p) for p in directory.glob("*.jsonl")), tmp_path / "ref", 0.05)
    common = ["--val_fraction=0.05", f"--cache_dir={tmp_path}/hf", f"--mirror={MIRROR}", "--num_proc=1"]
    outputs = []
    for kind in ("parquet", "jsonl"):
        data_dir = tmp_path / kind
        assert (
            prepare(
                "fineweb",
                f"--source={directory}/*.{kind}",
                *common,
                f"--data_dir={data_dir}",
                "--shard_tokens=2000",
            )
            == 0
        )
        out = data_dir / "fineweb"
        outputs.append((split_tokens(out, "train").tobytes(), split_tokens(out, "val").tobytes()))
        meta = Meta.read(out)
        assert len(meta.source["inputs"]) == 3 and meta.source["documents"]["val"] == 16
        assert len(meta.shards["train"]) > 1
    assert outputs[0] == outputs[1] == reference
    assert (
        prepare("fineweb-edu", f"--source={directory}", *common, f"--data_dir={tmp_path}/edu") == 2
    )  # mixed


@pytest.mark.slow
def test_fineweb_offline_names_the_hub_subset_and_the_mirror(tmp_path):
    env = {**os.environ, "GPTFORGE_DATA_MIRROR": "", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "gptforge", "prepare", "fineweb", f"--data_dir={tmp_path}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()[-1]
    assert "cannot load HuggingFaceFW/fineweb sample-10BT (revision main)" in error
    assert "GPTFORGE_DATA_MIRROR=DIR with fineweb/ inside it" in error


# ---- progress


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal, log = Terminal(), io.StringIO()
    for stream in (terminal, log):
        with Progress("tokenize", 10_000_000, stream=stream, interval=0) as progress:
            progress.update(4_000_000, 1_000_000)
    assert "tokenize:  40%" in terminal.getvalue() and "1,000,000 tokens" in terminal.getvalue()
    assert "B/s" in terminal.getvalue()  # tqdm's rate, and its time left after "<"
    first, last = log.getvalue().splitlines()
    assert first.startswith("tokenize: 40% 4.0/10.0 MB, ") and " MB/s, 1,000,000 tokens, 0m" in first
    assert first.endswith("s left")
    assert last.startswith("tokenize: 40% 4.0/10.0 MB, ") and last.endswith(
        " tokens"
    )  # at the end: no time left


def test_progress_is_plain_lines_when_not_a_terminal(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text " * 1000)
    assert prepare("text", f"--input={tmp_path}/a.txt", "--tokenizer=char", f"--data_dir={tmp_path}") == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("tokenize: 100% 0.0/0.0 MB, ") and line.endswith(" MB/s, 10,000 tokens")
