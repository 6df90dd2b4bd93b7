"""Throughput and memory of `gptforge prepare text --tokenizer=gpt2` against bare tiktoken on the same text.

    .venv/bin/python benchmarks/prepare.py [--sizes=10,25,50,100] [--repeat=3]

The input is the mirror's War and Peace (gutenberg/war_and_peace_pg2600.txt, 3.4 MB) repeated into a temporary
file of each size. Every measurement runs in a fresh process, so its peak RSS is its own (os.wait4):
- bare: the whole text already in memory, `encode_ordinary_batch` over 1 MB pieces on every core; only that call
  is timed.
- pipeline: `prepare text` end to end (reading, decoding, counting, hashing, tokenizing, writing, fsync, meta.json).
MB/s counts input bytes; each cell is the best of `--repeat` runs, bare and pipeline interleaved.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIECE = 1 << 20


def corpus_path() -> Path:
    mirror = Path(os.environ.get("GPTFORGE_DATA_MIRROR") or ROOT.parent / "shared" / "data")
    path = mirror / "gutenberg" / "war_and_peace_pg2600.txt"
    if not path.is_file():
        sys.exit(
            f"benchmarks/prepare.py needs {path}: set GPTFORGE_DATA_MIRROR to a mirror like ../shared/data"
        )
    return path


def one(mode: str, path: Path) -> dict:
    """Run one measurement in this process; returns seconds and CPU seconds of the timed part."""
    from gptforge.datasets import TextOptions, prepare_text
    from gptforge.tokenizer import gpt2_encoding

    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as out:
        if mode == "bare":
            encoding = gpt2_encoding(Path(os.environ["GPTFORGE_DATA_MIRROR"]))
            text = path.read_text(encoding="utf-8")
            pieces = [text[i : i + PIECE] for i in range(0, len(text), PIECE)]
            run = lambda: encoding.encode_ordinary_batch(pieces, num_threads=os.cpu_count() or 1)  # noqa: E731
        else:
            run = lambda: prepare_text(TextOptions(input=str(path), data_dir=out, tokenizer="gpt2"))  # noqa: E731
        cpu0, t0 = time.process_time(), time.perf_counter()
        run()
        return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - cpu0}


def measure(mode: str, path: Path) -> dict:
    """`one` in a child process, plus that child's peak RSS."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--one", mode, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    stdout = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    if status != 0:
        sys.exit(f"{mode} run on {path} failed (status {status})")
    result = json.loads(stdout)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # Linux reports KiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,25,50,100", help="input sizes in MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], Path(args.one[1]))))
        return
    source = corpus_path()
    os.environ.setdefault("GPTFORGE_DATA_MIRROR", str(source.parent.parent))
    book = source.read_bytes()
    print(f"# prepare text --tokenizer=gpt2 vs bare tiktoken, {os.cpu_count()} cores, best of {args.repeat}")
    print(
        "| input MB | bare tiktoken MB/s | pipeline MB/s | pipeline / bare | pipeline cores used | pipeline peak RSS MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"corpus-{size}mb.txt"
            path.write_bytes(book * (size * 10**6 // len(book)) + book[: size * 10**6 % len(book)])
            megabytes = path.stat().st_size / 1e6
            bare, pipeline = [], []
            for _ in range(args.repeat):
                bare.append(measure("bare", path))
                pipeline.append(measure("pipeline", path))
            best_bare = min(bare, key=lambda r: r["seconds"])
            best = min(pipeline, key=lambda r: r["seconds"])
            rss = max(r["peak_rss_mb"] for r in pipeline)
            print(
                f"| {megabytes:.0f} | {megabytes / best_bare['seconds']:.1f} | {megabytes / best['seconds']:.1f} "
                f"| {best_bare['seconds'] / best['seconds']:.0%} | {best['cpu_seconds'] / best['seconds']:.2f} "
                f"| {rss:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
