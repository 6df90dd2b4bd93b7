"""Tests for reading data at scale: splits of many shards (files.py), llm.c / modded-nanogpt token shards as
they are on disk, lazy opening, weighted mixtures (mixture.py, batches.py) and document-aligned rows.

    .venv/bin/python -m pytest tests/test_data_shards.py
"""

import dataclasses
import hashlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import (  # noqa: F401 (data_dir is a fixture)
    cli,
    cli_args,
    config,
    data_dir,
    eval_records,
    latest_step,
    step_losses,
    wait_for,
)

from gptforge.checkpoint import load_checkpoint
from gptforge.config import load_train_config
from gptforge.data import Batches, BatchSampler, Meta, TokenData, TokenDataset, token_dtype
from gptforge.data.files import LLMC_MAGIC, locate
from gptforge.data.mixture import Mixture, parse_mix
from gptforge.errors import GptforgeError
from gptforge.metrics import read_metrics
from gptforge.tokenizer import CharTokenizer
from gptforge.train import run_config, train

VOCAB = 1000
EOT = 999


def write_sharded(directory: Path, splits: dict[str, list[np.ndarray]], eot_token: int | None = None) -> Meta:
    """A dataset whose splits are shards that meta.json lists, as a sharded `gptforge prepare` lays it out."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(VOCAB)
    shards = {}
    for split, arrays in splits.items():
        shards[split] = []
        for i, tokens in enumerate(arrays):
            name = f"{split}_{i:06d}.bin"
            data = tokens.astype(dtype).tobytes()
            (directory / name).write_bytes(data)
            sha256 = hashlib.sha256(data).hexdigest()
            shards[split].append({"file": name, "tokens": len(tokens), "sha256": sha256})
    chars = "".join(chr(0x100 + i) for i in range(VOCAB))
    meta = Meta(CharTokenizer(chars).spec(), VOCAB, dtype, {s: sum(map(len, a)) for s, a in splits.items()},
                eot_token=eot_token, shards=shards)
    meta.write(directory)
    return meta


def write_llmc(path: Path, tokens: np.ndarray, magic: int = LLMC_MAGIC, version: int = 1) -> None:
    """A token shard exactly as llm.c's dev/data/data_common.py write_datafile writes one."""
    header = np.zeros(256, dtype=np.int32)
    header[:3] = magic, version, len(tokens)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.astype("<i4").tobytes() + tokens.astype("<u2").tobytes())


# ---- shards


def test_a_split_of_shards_reads_back_as_one_stream(tmp_path):
    rng = np.random.default_rng(0)
    train = [rng.integers(0, VOCAB, n) for n in (300, 50, 700)]
    write_sharded(tmp_path / "ds", {"train": train, "val": [rng.integers(0, VOCAB, 80)]})
    with TokenDataset(tmp_path / "ds", "train") as split:
        assert len(split) == 1050 and split.tokens.tolist() == np.concatenate(train).tolist()
        rows = split.windows(np.array([0, 290, 350, 1040]), 10)
        whole = np.concatenate(train)
        assert rows.tolist() == [whole[s:s + 10].tolist() for s in (0, 290, 350, 1040)]
        with pytest.raises(GptforgeError, match=r"20 tokens crosses the end of train_000000\.bin"):
            split.windows(np.array([290]), 20)
    assert Meta.read(tmp_path / "ds").shard_files("train") == [
        ("train_000000.bin", 300), ("train_000001.bin", 50), ("train_000002.bin", 700)]
    with open(tmp_path / "ds" / "train_000001.bin", "r+b") as f:
        f.truncate(98)
    with pytest.raises(GptforgeError, match=r"train_000001\.bin has 98 bytes but meta\.json says 50 uint16"):
        Meta.read(tmp_path / "ds")


def test_windows_never_cross_a_shard_and_reach_every_shard():
    lengths = [300, 20, 700, 64, 65]  # 20 and 64 hold no window of 65 tokens
    sampler = BatchSampler(lengths, 64, 512)
    bounds = np.cumsum([0, *lengths])
    starts = np.concatenate([sampler.starts(s) for s in range(20)])
    shard = np.searchsorted(bounds, starts, side="right") - 1
    assert (starts + 65 <= bounds[shard + 1]).all()
    assert set(shard.tolist()) == {0, 2, 4}
    # uniform over the places a window fits: 236 + 636 + 1 of them
    assert abs(np.mean(shard == 2) - 636 / 873) < 0.02
    epoch = BatchSampler(lengths, 64, 10, replacement=False)
    assert epoch.n_windows == 4 + 10 + 1
    seen = np.concatenate([epoch.starts(s) for s in range(3)])[:15]
    assert sorted(seen.tolist()) == sorted([*range(0, 256, 64), *range(320, 960, 64), 1084])


def test_one_shard_listed_in_meta_is_the_plain_file(tmp_path):
    tokens = np.arange(5000) % VOCAB
    write_sharded(tmp_path / "sharded", {"train": [tokens], "val": [tokens[:100]]})
    plain = tmp_path / "plain"
    plain.mkdir()
    tokens.astype("<u2").tofile(plain / "train.bin")
    tokens[:100].astype("<u2").tofile(plain / "val.bin")
    Meta(Meta.read(tmp_path / "sharded").tokenizer, VOCAB, "uint16", {"train": 5000, "val": 100}).write(plain)
    a = Batches(TokenDataset(tmp_path / "sharded"), block_size=16, batch_size=8)
    b = Batches(TokenDataset(plain), block_size=16, batch_size=8)
    for step in range(5):
        assert all(torch.equal(u, v) for u, v in zip(a.get(step), b.get(step), strict=True))


# ---- llm.c shards


def llmc_dir(directory: Path, n_train: int = 2, tokens: int = 2000) -> dict[str, np.ndarray]:
    """llm.c fineweb.py's layout: shard 0 is val, the rest train."""
    rng = np.random.default_rng(1)
    streams: dict[str, list[np.ndarray]] = {}
    for index in range(n_train + 1):
        split = "val" if index == 0 else "train"
        data = rng.integers(0, 50257, tokens)
        write_llmc(directory / f"fineweb_{split}_{index:06d}.bin", data)
        streams.setdefault(split, []).append(data)
    return {split: np.concatenate(parts) for split, parts in streams.items()}


def test_llmc_shards_read_back_exactly(tmp_path):
    streams = llmc_dir(tmp_path / "fineweb10B")
    (tmp_path / "fineweb10B" / "README").write_text("not a shard")
    for where in (str(tmp_path / "fineweb10B"), str(tmp_path / "fineweb10B" / "fineweb_train_*.bin")):
        directory, meta = locate("data", where)
        assert meta.tokens == {"train": 4000, "val": 2000} and meta.tokenizer["kind"] == "gpt2"
        assert meta.eot_token == 50256
        for split in ("train", "val"):
            with TokenDataset(directory, split, meta) as data:
                assert data.tokens.tolist() == streams[split].tolist()


def test_bad_llmc_shards_are_named(tmp_path):
    write_llmc(tmp_path / "a" / "x_train_000001.bin", np.arange(10))
    with pytest.raises(GptforgeError, match=r"has no llm\.c val shards"):
        locate("data", tmp_path / "a")
    write_llmc(tmp_path / "b" / "x_val_000000.bin", np.arange(10))
    write_llmc(tmp_path / "b" / "x_train_000001.bin", np.arange(10), magic=20240801, version=7)
    with pytest.raises(GptforgeError, match=r"magic 20240801, version 7 .*gptforge reads GPT-2's"):
        locate("data", tmp_path / "b")
    write_llmc(tmp_path / "c" / "x_val_000000.bin", np.arange(10))
    write_llmc(tmp_path / "c" / "x_train_000001.bin", np.arange(10))
    with open(tmp_path / "c" / "x_train_000001.bin", "r+b") as f:
        f.truncate(1030)
    with pytest.raises(GptforgeError, match="has 1,030 bytes but its header says 10 tokens"):
        locate("data", tmp_path / "c")
    with pytest.raises(GptforgeError, match="matches no files"):
        locate("data", str(tmp_path / "nothing_train_*.bin"))


def test_a_thousand_shards_open_lazily(tmp_path):
    for index in range(1000):  # each shard's tokens are its index
        write_llmc(tmp_path / "many" / f"many_{'val' if index == 0 else 'train'}_{index:06d}.bin",
                   np.full(40, index))
    directory, meta = locate("data", tmp_path / "many")
    data = TokenData(directory, 16, meta=meta)
    train = data.splits["train"]
    assert train.maps_opened == 0 and len(train.shards) == 999
    x, y = data.batches("train", 16, 64).get(0)
    rows = torch.cat([x, y[:, -1:]], 1).numpy()
    assert (rows == rows[:, :1]).all()  # every row inside one shard
    assert train.maps_opened == len(np.unique(rows[:, 0])) and len(train._open) <= train.max_open
    small = TokenDataset(directory, "train", meta, max_open=4)
    small.windows(np.arange(0, 40 * 20, 40), 40)
    assert small.maps_opened == 20 and len(small._open) == 4


# ---- mixtures


def two_sources(tmp_path: Path) -> dict[str, TokenDataset]:
    """Two datasets of one tokenizer, told apart by their tokens: a's are below 500, b's 500 and up."""
    rng = np.random.default_rng(2)
    write_sharded(tmp_path / "a", {"train": [rng.integers(0, 500, 3000)] * 2,
                                   "val": [rng.integers(0, 500, 500)]})
    write_sharded(tmp_path / "b", {"train": [rng.integers(500, VOCAB, 4000)],
                                   "val": [rng.integers(500, VOCAB, 500)]})
    return {name: TokenDataset(tmp_path / name) for name in "ab"}


def test_mixture_proportions_hold_every_step(tmp_path):
    a, b = two_sources(tmp_path).values()
    batches = Batches({"a": (a, 0.7), "b": (b, 0.3)}, block_size=8, batch_size=20)
    from_a = [int((batches.get(step)[0] < 500).all(1).sum()) for step in range(300)]
    assert set(from_a) == {14}  # 0.7 of 20 rows is exactly 14
    odd = Batches({"a": (a, 2), "b": (b, 1)}, block_size=8, batch_size=10)  # 6.67 rows: 6 or 7
    counts = [int((odd.get(step)[0] < 500).all(1).sum()) for step in range(300)]
    assert set(counts) <= {6, 7} and abs(np.mean(counts) / 10 - 2 / 3) < 0.01
    x0, x1 = batches.get(0)[0], batches.get(1)[0]
    assert not torch.equal(x0 < 500, x1 < 500)  # the rows' order is drawn afresh every step


def test_mixture_shares_are_world_size_independent_and_resume(tmp_path):
    a, b = two_sources(tmp_path).values()
    mix = {"a": (a, 0.6), "b": (b, 0.4)}
    one = Batches(mix, block_size=8, batch_size=8)
    ranks = [Batches(mix, block_size=8, batch_size=8, rank=r, world_size=4) for r in range(4)]
    for step in range(5):
        assert torch.equal(torch.cat([r.get(step)[0] for r in ranks]), one.get(step)[0])
    for _ in range(3):
        next(one)
    state = one.state_dict()
    assert state["mix"] == "a:0.6,b:0.4"
    resumed = Batches(mix, block_size=8, batch_size=8)
    resumed.load_state_dict(state)
    assert all(torch.equal(u, v) for u, v in zip(next(one), next(resumed), strict=True))
    with pytest.raises(GptforgeError, match=r"batch settings changed \(mix a:0.6,b:0.4 -> a:0.5,b:0.5\)"):
        Batches({"a": (a, 1), "b": (b, 1)}, block_size=8, batch_size=8).load_state_dict(state)


def test_data_mix_spec_and_its_errors(tmp_path, data_dir):  # noqa: F811
    assert parse_mix("fineweb:0.7, shakespeare:0.3") == {"fineweb": 0.7, "shakespeare": 0.3}
    for bad in ("fineweb", "fineweb:0", "a:1,a:2", "fineweb:x"):
        with pytest.raises(GptforgeError, match="--data_mix"):
            parse_mix(bad)
    config_file = tmp_path / "mix.toml"
    config_file.write_text("[data_mix]\nfineweb = 0.7\nshakespeare = 0.3\n")
    assert load_train_config([str(config_file)], {}).data_mix == "fineweb:0.7,shakespeare:0.3"
    two_sources(tmp_path)
    with pytest.raises(GptforgeError, match=r"corpus's tokenizer \(char, vocab \d+\) is not a's \(char, "
                                            r"vocab 1000\); every source must share one tokenizer"):
        Mixture(f"a:1,{data_dir / 'corpus'}:1", tmp_path, 8)


def second_source(data_dir: Path) -> str:  # noqa: F811
    """`corpus` reversed: a dataset of the same tokenizer with other text; returns the mixture."""
    target = data_dir / "reversed"
    if not target.exists():
        target.mkdir()
        meta = Meta.read(data_dir / "corpus")
        for split in ("train", "val"):
            tokens = np.fromfile(data_dir / "corpus" / f"{split}.bin", dtype=np.uint16)
            tokens[::-1].tofile(target / f"{split}.bin")
        dataclasses.replace(meta, dataset="reversed").write(target)
    return "corpus:0.75,reversed:0.25"


@pytest.mark.slow
def test_a_mixed_run_logs_each_source_and_resumes_bit_identical(data_dir, tmp_path, capsys):  # noqa: F811
    mix = second_source(data_dir)
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(config(data_dir, whole, max_iters=20, data_mix=mix))
    evals = eval_records(whole)
    assert evals and all({"val_loss/corpus", "val_loss/reversed"} <= set(r) for r in evals)
    train(config(data_dir, part, max_iters=10, data_mix=mix))
    capsys.readouterr()
    train(run_config([], {"init_from": "resume", "out_dir": str(part), "max_iters": "20"}))
    line = r"step 20: train loss .*, val loss \S+ \(corpus \S+, reversed \S+\)"
    assert re.search(line, capsys.readouterr().out)
    assert step_losses(part) == step_losses(whole)
    assert [r["val_loss/reversed"] for r in eval_records(part)] == [r["val_loss/reversed"] for r in evals]


@pytest.mark.slow
def test_a_mixed_run_killed_resumes_bit_identical(data_dir, tmp_path):  # noqa: F811
    mix = second_source(data_dir)
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    train(config(data_dir, whole, max_iters=60, data_mix=mix))
    cfg = config(data_dir, cut, max_iters=60, data_mix=mix)
    process = subprocess.Popen([sys.executable, "-m", "gptforge", "train", *cli_args(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: latest_step(cut) >= 23, process, timeout=600)
    process.kill()
    process.wait(timeout=60)
    assert load_checkpoint(cut)["iter_num"] % 10 == 0
    result = cli("train", "--init_from=resume", f"--out_dir={cut}")
    assert result.returncode == 0, result.stderr
    assert step_losses(cut) == step_losses(whole)
    assert [r["val_loss/corpus"] for r in eval_records(cut)] == [
        r["val_loss/corpus"] for r in eval_records(whole)]


@pytest.mark.slow
def test_a_mixture_on_two_processes_matches_one(data_dir, tmp_path):  # noqa: F811
    from test_distributed import assert_close_history, torchrun

    mix = second_source(data_dir)
    single, multi = tmp_path / "single", tmp_path / "multi"
    cfg = config(data_dir, single, max_iters=10, eval_interval=5, dropout=0.0, data_mix=mix)
    train(cfg)
    result = torchrun(*cli_args(dataclasses.replace(cfg, out_dir=str(multi))))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_history(single, multi)
    a, b = eval_records(single), eval_records(multi)
    assert max(abs(x["val_loss/reversed"] - y["val_loss/reversed"]) for x, y in zip(a, b, strict=True)) < 1e-5


def test_llmc_shards_train_with_no_conversion(tmp_path):
    llmc_dir(tmp_path / "fineweb10B", tokens=600)
    out = tmp_path / "run"
    train(config(tmp_path, out, dataset=str(tmp_path / "fineweb10B" / "fineweb_train_*.bin"), max_iters=2,
                 eval_interval=2, eval_iters=1, n_embd=16, block_size=16))
    assert load_checkpoint(out)["model_args"]["vocab_size"] == 50304
    assert len(read_metrics(out / "metrics.jsonl")) == 4  # 2 steps, 2 evals


# ---- rows aligned to documents


def test_aligned_rows_start_at_the_end_of_text_that_opens_a_document(tmp_path):
    rng = np.random.default_rng(3)
    documents = [rng.integers(0, EOT, rng.integers(5, 60)) for _ in range(300)]
    stream = np.concatenate([np.append(d, EOT) for d in documents])  # gptforge's layout: EOT after each
    cut = len(stream) // 2
    write_sharded(tmp_path / "docs", {"train": [stream[:cut], stream[cut:]], "val": [stream[:400]]}, EOT)
    batches = TokenData(tmp_path / "docs", 32, align_rows="bos").batches("train", 32, 64)
    assert batches.state_dict()["align_rows"] == "bos"
    plain = TokenData(tmp_path / "docs", 32).batches("train", 32, 64)
    for step in range(20):
        x, y = batches.get(step)
        assert (x[:, 0] == EOT).all() and (y[:, 0] != EOT).all()  # targets begin with a document
        assert not (plain.get(step)[0][:, 0] == EOT).all()
    write_sharded(tmp_path / "noeot", {"train": [stream], "val": [stream]})
    with pytest.raises(GptforgeError, match=r"no end-of-text token .*use --align_rows=none"):
        TokenData(tmp_path / "noeot", 32, align_rows="bos")
