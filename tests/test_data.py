"""Tests for gptforge.data's reading side (files.py, batches.py): the token-file format, the memory-mapped
dataset and the batch sampler.

.venv/bin/python -m pytest tests/test_data.py
"""

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gptforge.data import Batches, BatchSampler, Meta, TokenDataset, shuffle_index, token_dtype
from gptforge.errors import GptforgeError
from gptforge.tokenizer import CharTokenizer


def write_dataset(directory: Path, train: np.ndarray, val: np.ndarray, vocab_size: int = 1000) -> Meta:
    """A dataset as `gptforge prepare` lays it out, with a char tokenizer standing in for the real one."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    train.astype(dtype).tofile(directory / "train.bin")
    val.astype(dtype).tofile(directory / "val.bin")
    chars = "".join(chr(0x100 + i) for i in range(vocab_size))
    meta = Meta(CharTokenizer(chars).spec(), vocab_size, dtype, {"train": len(train), "val": len(val)})
    meta.write(directory)
    return meta


@pytest.fixture
def dataset_dir(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    write_dataset(tmp_path / "ds", rng.integers(0, 1000, 10_000), rng.integers(0, 1000, 1_000))
    return tmp_path / "ds"


# ---- format


def test_token_dtype_follows_the_vocabulary():
    assert token_dtype(65) == token_dtype(50257) == token_dtype(65535) == "uint16"
    assert token_dtype(65536) == token_dtype(100_277) == "uint32"
    assert token_dtype(50257, "uint32") == "uint32"
    with pytest.raises(GptforgeError, match="vocab_size 70000 does not fit uint16; use --dtype=uint32"):
        token_dtype(70_000, "uint16")


def test_meta_round_trip(dataset_dir):
    meta = Meta.read(dataset_dir)
    assert (
        meta.tokens == {"train": 10_000, "val": 1_000} and meta.dtype == "uint16" and meta.vocab_size == 1000
    )
    assert json.loads((dataset_dir / "meta.json").read_text())["gptforge_version"] == meta.gptforge_version
    assert meta.load_tokenizer(dataset_dir).decode([0, 1]) == "\u0100\u0101"


def test_meta_errors_name_the_problem_and_the_fix(dataset_dir, tmp_path):
    with pytest.raises(
        GptforgeError, match=r"no dataset at .*nowhere; create it with `gptforge prepare NAME"
    ):
        Meta.read(tmp_path / "nowhere")
    with open(dataset_dir / "train.bin", "r+b") as f:
        f.truncate(19_998)
    with pytest.raises(
        GptforgeError, match=r"train.bin has 19,998 bytes but meta.json says 10,000 uint16 tokens"
    ):
        Meta.read(dataset_dir)
    (dataset_dir / "meta.json").write_text("{not json")
    with pytest.raises(GptforgeError, match=r"is not a gptforge meta.json"):
        Meta.read(dataset_dir)
    (dataset_dir / "meta.json").unlink()
    with pytest.raises(
        GptforgeError, match=r"meta.json is missing, so .* is incomplete .* re-run `gptforge prepare`"
    ):
        Meta.read(dataset_dir)


def test_a_missing_bin_file_is_named(dataset_dir):
    (dataset_dir / "val.bin").unlink()
    with pytest.raises(
        GptforgeError, match=r"val.bin is missing but meta.json says 1,000 uint16 tokens \(2,000 bytes\)"
    ):
        Meta.read(dataset_dir)


def test_meta_with_a_dtype_too_small_for_its_vocabulary(dataset_dir):
    raw = json.loads((dataset_dir / "meta.json").read_text())
    (dataset_dir / "meta.json").write_text(json.dumps({**raw, "vocab_size": 70_000}))
    with pytest.raises(GptforgeError, match="vocab_size 70000 does not fit its dtype uint16"):
        Meta.read(dataset_dir)


def nanogpt_char_dataset(directory: Path, text: str) -> None:
    """What nanoGPT's data/shakespeare_char/prepare.py leaves behind (no meta.json)."""
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    directory.mkdir()
    np.array([stoi[c] for c in text[:20]], dtype=np.uint16).tofile(directory / "train.bin")
    np.array([stoi[c] for c in text[20:]], dtype=np.uint16).tofile(directory / "val.bin")
    meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
    (directory / "meta.pkl").write_bytes(pickle.dumps(meta))


def test_nanogpt_meta_pkl_is_read_as_a_char_dataset(tmp_path):
    text = "First Citizen:\nBefore we proceed any further"
    nanogpt_char_dataset(tmp_path / "nano", text)
    meta = Meta.read(tmp_path / "nano")
    assert meta.tokens == {"train": 20, "val": 24} and meta.vocab_size == 23
    with TokenDataset(tmp_path / "nano", "val") as val:
        assert meta.load_tokenizer(tmp_path / "nano").decode(val.tokens) == "e we proceed any further"


class _Payload:
    """Pickles as a call of builtins.open: what a hostile meta.pkl would use to run code."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_meta_pkl_that_names_code_is_refused_unrun(tmp_path):
    (tmp_path / "evil").mkdir()
    marker = tmp_path / "ran"
    (tmp_path / "evil" / "meta.pkl").write_bytes(pickle.dumps({"vocab_size": _Payload(marker)}))
    with pytest.raises(
        GptforgeError, match=r"is not nanoGPT's \{vocab_size, itos, stoi\} meta.pkl .*refusing to load"
    ):
        Meta.read(tmp_path / "evil")
    assert not marker.exists()


# ---- dataset


def test_windows_are_the_token_slices(dataset_dir):
    with TokenDataset(dataset_dir, "val") as val:
        rows = val.windows(np.array([0, 7, 999 - 5]), 6)
        expected = np.fromfile(dataset_dir / "val.bin", dtype=np.uint16)
        assert len(val) == 1000 and rows.tolist() == [expected[s : s + 6].tolist() for s in (0, 7, 994)]


def test_uint32_tokens_above_65535_are_read_back(tmp_path):
    directory = tmp_path / "wide"
    directory.mkdir()
    ids = np.arange(65_000, 70_000)
    ids.astype("<u4").tofile(directory / "train.bin")
    ids[:100].astype("<u4").tofile(directory / "val.bin")
    Meta({"kind": "gpt2"}, 70_000, token_dtype(70_000), {"train": 5000, "val": 100}).write(directory)
    with TokenDataset(directory) as train:
        assert train.meta.dtype == "uint32"
        x, _ = Batches(train, block_size=8, batch_size=4).get(0)
        starts = BatchSampler(5000, 8, 4).starts(0)
        assert x.tolist() == [list(range(65_000 + s, 65_000 + s + 8)) for s in starts]


def test_empty_or_unknown_split_is_an_error(tmp_path):
    write_dataset(tmp_path / "ds", np.arange(10), np.arange(0))
    with pytest.raises(GptforgeError, match=r"val.bin is empty; re-run `gptforge prepare` with more text"):
        TokenDataset(tmp_path / "ds", "val")
    with pytest.raises(GptforgeError, match="has no 'test' split; it has train, val"):
        TokenDataset(tmp_path / "ds", "test")


def _resident_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
def test_one_long_lived_mapping_keeps_memory_flat(tmp_path):
    n = 32 * 2**20  # 64 MB of uint16 tokens, every byte of it read below
    write_dataset(tmp_path / "big", np.arange(n) % 50_000, np.arange(10), vocab_size=50_000)
    with TokenDataset(tmp_path / "big") as train:
        batches = Batches(train, block_size=4096, batch_size=64, replacement=False)
        before = _resident_mb()
        for _ in range(batches.sampler.n_windows // 64 + 1):  # one whole epoch
            next(batches)
        assert _resident_mb() - before < 16


# ---- sampler


def test_with_replacement_is_a_pure_function_of_seed_split_and_step():
    a = BatchSampler(10_000, 64, 12, seed=1337)
    assert np.array_equal(a.starts(5), BatchSampler(10_000, 64, 12, seed=1337).starts(5))
    assert not np.array_equal(a.starts(5), a.starts(6))
    assert not np.array_equal(a.starts(5), BatchSampler(10_000, 64, 12, seed=1338).starts(5))
    assert not np.array_equal(a.starts(5), BatchSampler(10_000, 64, 12, seed=1337, split="val").starts(5))
    starts = np.concatenate([a.starts(s) for s in range(2000)])
    assert starts.min() == 0 and starts.max() == 10_000 - 64 - 1  # nanoGPT's range: randint(len - block_size)


def test_without_replacement_every_epoch_visits_each_window_once():
    sampler = BatchSampler(1000, 10, 8, replacement=False)  # 99 windows: epochs end mid-batch
    assert sampler.n_windows == 99
    starts = np.concatenate([sampler.starts(s) for s in range(99)])  # 8 epochs exactly
    epochs = starts.reshape(8, 99)
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(0, 990, 10))
    assert len({tuple(e) for e in epochs}) == 8  # a fresh order every epoch
    assert starts.max() + 10 + 1 <= 1000


@given(st.integers(1, 5000), st.integers(0, 2**32))
def test_shuffle_index_is_a_permutation(n, seed):
    assert sorted(shuffle_index(np.arange(n), n, [seed]).tolist()) == list(range(n))


def test_too_short_a_split_is_an_error():
    with pytest.raises(GptforgeError, match=r"the val split has 64 tokens, fewer than block_size \+ 1 = 65"):
        BatchSampler(64, 64, 4, split="val")


# ---- batches


def test_batches_are_shifted_windows(dataset_dir):
    with TokenDataset(dataset_dir) as train:
        x, y = Batches(train, block_size=32, batch_size=6).get(3)
        assert x.shape == y.shape == (6, 32) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        tokens = torch.from_numpy(train.tokens.astype(np.int64))
        for row, start in zip(x, BatchSampler(len(train), 32, 6).starts(3), strict=True):
            assert torch.equal(row, tokens[start : start + 32])


@pytest.mark.parametrize("replacement", [True, False])
def test_the_global_batch_does_not_depend_on_the_number_of_processes(dataset_dir, replacement):
    with TokenDataset(dataset_dir) as train:
        one = Batches(train, block_size=16, batch_size=8, replacement=replacement)
        for world_size in (2, 4):
            ranks = [
                Batches(
                    train, block_size=16, batch_size=8, replacement=replacement, rank=r, world_size=world_size
                )
                for r in range(world_size)
            ]
            for step in range(5):
                shares = [batches.get(step) for batches in ranks]
                x, y = one.get(step)
                assert torch.equal(torch.cat([s[0] for s in shares]), x)
                assert torch.equal(torch.cat([s[1] for s in shares]), y)


@pytest.mark.parametrize("replacement", [True, False])
def test_resume_continues_the_same_sequence(dataset_dir, replacement):
    with TokenDataset(dataset_dir) as train:
        run = Batches(train, block_size=16, batch_size=4, replacement=replacement)
        for _ in range(3):
            next(run)
        state = run.state_dict()
        assert state == {
            "step": 3,
            "seed": 1337,
            "block_size": 16,
            "batch_size": 4,
            "replacement": int(replacement),
        }
        resumed = Batches(train, block_size=16, batch_size=4, replacement=replacement)
        resumed.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint would carry it
        for _ in range(3):
            assert all(torch.equal(a, b) for a, b in zip(next(run), next(resumed), strict=True))


def test_resume_with_other_batch_settings_is_an_error(dataset_dir):
    with TokenDataset(dataset_dir) as train:
        state = Batches(train, block_size=16, batch_size=4).state_dict()
        with pytest.raises(GptforgeError, match=r"batch settings changed .*block_size 16 -> 32"):
            Batches(train, block_size=32, batch_size=4).load_state_dict(state)


def test_prefetch_gives_the_same_batches(dataset_dir):
    with TokenDataset(dataset_dir) as train:
        plain = Batches(train, block_size=16, batch_size=4)
        ahead = Batches(train, block_size=16, batch_size=4, prefetch=True)
        try:
            for step in [0, 1, 2, 7, 8, 3]:  # in order, then jumps the prefetch did not guess
                assert all(torch.equal(a, b) for a, b in zip(plain.get(step), ahead.get(step), strict=True))
        finally:
            ahead.close()


def test_batch_split_errors(dataset_dir):
    with TokenDataset(dataset_dir) as train:
        with pytest.raises(
            GptforgeError, match="global batch of 6 rows does not split evenly over 4 processes"
        ):
            Batches(train, block_size=16, batch_size=6, world_size=4)
        with pytest.raises(GptforgeError, match=r"rank 2 is not in \[0, 2\)"):
            Batches(train, block_size=16, batch_size=6, rank=2, world_size=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batches_come_through_pinned_memory(dataset_dir):
    with TokenDataset(dataset_dir) as train:
        cpu = Batches(train, block_size=16, batch_size=4).get(0)
        gpu = Batches(train, block_size=16, batch_size=4, device="cuda", prefetch=True)
        assert gpu._host(0)[0].is_pinned()
        x, y = gpu.get(0)
        assert x.is_cuda and torch.equal(x.cpu(), cpu[0]) and torch.equal(y.cpu(), cpu[1])
        gpu.close()
