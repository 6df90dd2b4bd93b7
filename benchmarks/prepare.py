"""Throughput and memory of `gptforge prepare text --tokenizer=gpt2` against bare tiktoken on the same text.

    .venv/bin/python benchmarks/prepare.py [--sizes=10,25,50,100] [--repeat=5]

The input is the mirror's War and Peace (gutenberg/war_and_peace_pg2600.txt, 3.4 MB) repeated into a temporary
file of each size. Every measurement runs in a fresh process, so its peak RSS is its own (os.wait4):
- bare: the whole text already in memory, `encode_ordinary_batch` over 1 MB pieces on every core; only that
  call is timed.
- pipeline: `prepare text` end to end (reading, decoding, counting, hashing, tokenizing, writing, fsync,
  meta.json).
MB/s counts input bytes. "cores used" is CPU seconds over wall seconds, which other work on a shared machine
lowers; "encodes in flight" is the summed time of the tokenizer calls over wall time, which it does not (2 on
2 cores: the tokenizer threads never wait for text). Bare and pipeline runs alternate and each cell is the
median of `--repeat` runs ("pipeline / bare" the median of the back-to-back pairs' ratios): on a shared
machine compare the ratio, not the absolute MB/s.
"""

import argparse
import json
import os
import statistics
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
    """Run one measurement in this process: seconds and CPU seconds of the timed part, and how many encode
    calls were in flight on average (2 on 2 cores means the tokenizer threads never waited for work)."""
    from gptforge.data.prepare import TextOptions, prepare_text
    from gptforge.tokenizer import GPT2Tokenizer, gpt2_encoding

    busy = []

    def timed(encode):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            result = encode(*args, **kwargs)
            busy.append(time.perf_counter() - t)
            return result

        return wrapper

    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as out:
        if mode == "bare":
            encoding = gpt2_encoding(Path(os.environ["GPTFORGE_DATA_MIRROR"]))
            encoding.encode_ordinary = timed(encoding.encode_ordinary)  # what encode_ordinary_batch calls
            text = path.read_text(encoding="utf-8")
            pieces = [text[i : i + PIECE] for i in range(0, len(text), PIECE)]
            run = lambda: encoding.encode_ordinary_batch(  # noqa: E731
                pieces, num_threads=os.cpu_count() or 1
            )
        else:
            GPT2Tokenizer.encode_to_numpy = timed(GPT2Tokenizer.encode_to_numpy)
            run = lambda: prepare_text(  # noqa: E731
                TextOptions(input=str(path), data_dir=out, tokenizer="gpt2")
            )
        cpu0, t0 = time.process_time(), time.perf_counter()
        run()
        seconds = time.perf_counter() - t0
        return {"seconds": seconds, "cpu_seconds": time.process_time() - cpu0,
                "in_flight": sum(busy) / seconds}


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
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--one", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], Path(args.one[1]))))
        return
    source = corpus_path()
    os.environ.setdefault("GPTFORGE_DATA_MIRROR", str(source.parent.parent))
    book = source.read_bytes()
    print(
        f"# prepare text --tokenizer=gpt2 vs bare tiktoken, {os.cpu_count()} cores, median of {args.repeat}"
    )
    print(
        "| input MB | bare tiktoken MB/s | pipeline MB/s | pipeline / bare "
        "| bare cores used | pipeline cores used | pipeline encodes in flight | pipeline peak RSS MB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    with tempfile.TemporaryDirectory() as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            path = Path(tmp) / f"corpus-{size}mb.txt"
            path.write_bytes(book * (size * 10**6 // len(book)) + book[: size * 10**6 % len(book)])
            megabytes = path.stat().st_size / 1e6
            bare, pipeline = [], []
            for _ in range(args.repeat):
                bare.append(measure("bare", path))
                pipeline.append(measure("pipeline", path))
            # Each pair ran back to back, so its ratio is the fairest comparison under shifting load.
            ratio = statistics.median(
                b["seconds"] / p["seconds"] for b, p in zip(bare, pipeline, strict=True)
            )
            bare_s = statistics.median(r["seconds"] for r in bare)
            pipe_s = statistics.median(r["seconds"] for r in pipeline)
            bare_cores = statistics.median(r["cpu_seconds"] / r["seconds"] for r in bare)
            pipe_cores = statistics.median(r["cpu_seconds"] / r["seconds"] for r in pipeline)
            in_flight = statistics.median(r["in_flight"] for r in pipeline)
            rss = max(r["peak_rss_mb"] for r in pipeline)
            print(
                f"| {megabytes:.0f} | {megabytes / bare_s:.1f} | {megabytes / pipe_s:.1f} | {ratio:.0%} "
                f"| {bare_cores:.2f} | {pipe_cores:.2f} | {in_flight:.2f} | {rss:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
