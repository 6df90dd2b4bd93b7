"""Data-loader throughput: tokens/s that `Batches` serves the trainer, against what the trainer consumes.

    .venv/bin/python benchmarks/data.py [--tokens=20000000] [--shards=1000] [--rounds=5] [--seconds=1.0]

Datasets of random GPT-2 ids are written to a temporary directory: one `train.bin` ("single"), the same
number of tokens as `--shards` llm.c shards ("shards", read as they are), a 0.7/0.3 mixture of the two
("mixture"), and the single file with documents of 1-2,000 tokens ending in end-of-text, rows aligned to them
("aligned"). Each is timed at the quick-start shape (12 rows x 64 tokens) and at GPT-2 124M's (480 rows x
1024 tokens, one process), `Batches.get` on the CPU with no prefetch (what a step waits for without it); each
round interleaves every case, and a case's figure is the median over rounds. The trainer's own tokens/s at
the quick-start config (configs/quickstart_cpu.toml's model on a 65-token vocabulary) is measured in the same
run with `gptforge bench`, and each loader figure is reported as a multiple of it.
"""

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from gptforge.bench import BenchOptions, bench
from gptforge.data import Batches, Meta, TokenDataset
from gptforge.data.files import LLMC_MAGIC, locate
from gptforge.tokenizer import CharTokenizer

SHAPES = {"quick-start 12x64": (12, 64), "GPT-2 480x1024": (480, 1024)}


def write_datasets(root: Path, tokens: int, shards: int) -> dict[str, dict[str, tuple[TokenDataset, float]]]:
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50256, tokens, dtype=np.uint16)
    single = root / "single"
    single.mkdir()
    ids.tofile(single / "train.bin")
    ids[:100_000].tofile(single / "val.bin")
    Meta({"kind": "gpt2"}, 50257, "uint16", {"train": tokens, "val": 100_000}, eot_token=50256).write(single)
    docs = ids.copy()
    docs[np.cumsum(rng.integers(1, 2000, tokens // 1000)) % tokens] = 50256
    aligned = root / "aligned"
    aligned.mkdir()
    docs.tofile(aligned / "train.bin")
    docs[:100_000].tofile(aligned / "val.bin")
    Meta({"kind": "gpt2"}, 50257, "uint16", {"train": tokens, "val": 100_000}, eot_token=50256).write(aligned)
    (root / "shards").mkdir()
    header = np.zeros(256, dtype="<i4")
    per = tokens // shards
    header[:3] = LLMC_MAGIC, 1, per
    for index in range(shards + 1):  # llm.c's layout: shard 0 is val
        split = "val" if index == 0 else "train"
        with open(root / "shards" / f"fineweb_{split}_{index:06d}.bin", "wb") as f:
            f.write(header.tobytes())
            f.write(ids[(index - 1) * per:index * per].tobytes() if index else ids[:per].tobytes())
    directory, meta = locate(root, "shards")
    sharded = TokenDataset(directory, "train", meta)
    plain = TokenDataset(single, "train")
    return {
        "single": {"": (plain, 1.0)},
        "shards": {"": (sharded, 1.0)},
        "mixture": {"single": (plain, 0.7), "shards": (sharded, 0.3)},
        "aligned": {"": (TokenDataset(aligned, "train"), 1.0)},
    }


def loader_tokens_per_s(sources: dict, rows: int, block: int, seconds: float, align: str) -> float:
    batches = Batches(sources if len(sources) > 1 else next(iter(sources.values()))[0], block, rows,
                      align_rows=align)
    batches.get(0)  # first touches: mappings, an aligned shard's index
    steps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        batches.get(steps + 1)
        steps += 1
    return steps * rows * block / (time.perf_counter() - t0)


def trainer_tokens_per_s(root: Path) -> float:
    chars = "".join(chr(32 + i) for i in range(65))
    directory = root / "char"
    directory.mkdir()
    ids = np.random.default_rng(1).integers(0, 65, 1_000_000, dtype=np.uint16)
    ids.tofile(directory / "train.bin")
    ids[:100_000].tofile(directory / "val.bin")
    Meta(CharTokenizer(chars).spec(), 65, "uint16", {"train": 1_000_000, "val": 100_000}).write(directory)
    opts = BenchOptions(data_dir=str(root), dataset="char", batch_size=12, block_size=64, n_layer=4, n_head=4,
                        n_embd=128, dropout=0.0, gelu_approximate="none", device="cpu", compile=False,
                        burn_in=10, steps=50)
    return bench(opts).tokens_per_sec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="timed per case per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="gptforge-data-bench-") as tmp:
        root = Path(tmp)
        datasets = write_datasets(root, args.tokens, args.shards)
        trainer = trainer_tokens_per_s(root)
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for shape, (rows, block) in SHAPES.items():
                for name, sources in datasets.items():
                    align = "bos" if name == "aligned" else "none"
                    rate = loader_tokens_per_s(sources, rows, block, args.seconds, align)
                    results.setdefault((shape, name), []).append(rate)
    print("| shape | data | loader tokens/s (median) | range | x trainer |")
    print("| --- | --- | ---: | ---: | ---: |")
    for (shape, name), rates in results.items():
        median = statistics.median(rates)
        print(f"| {shape} | {name} | {median:,.0f} | {min(rates):,.0f}-{max(rates):,.0f} | "
              f"{median / trainer:,.0f}x |")
    print(f"\ntrainer (quick-start config, gptforge bench): {trainer:,.0f} tokens/s")


if __name__ == "__main__":
    main()
