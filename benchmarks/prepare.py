"""Throughput and memory of `gptforge prepare text --tokenizer=gpt2 --num_proc=N` against bare tiktoken on the
same text.

    .venv/bin/python benchmarks/prepare.py [--sizes=10,100] [--procs=1,2] [--repeat=3] [--big=1000]

The input is the mirror's War and Peace (gutenberg/war_and_peace_pg2600.txt, 3.4 MB) repeated into a temporary
file of each size (deleted afterwards). Every measurement runs in a fresh process:
- bare N: the whole text already in memory, tiktoken's `encode_ordinary_batch(pieces, num_threads=N)` over
  1 MB pieces; only that call is timed.
- pipeline N: `prepare text --num_proc=N` end to end (counting, hashing, reading, decoding, tokenizing on N
  worker processes, sharding, fsync, meta.json), timed from the call to its return.
MB/s counts input bytes. "pipeline / bare" compares the same parallelism (N processes against N threads);
"per process / bare 1" is the pipeline's MB/s per process over bare tiktoken's on one thread; "speedup" is the
pipeline's MB/s over its own at N=1. CPU s/MB is the CPU time of the whole process tree (start-up, the
interpreter and torch's import included) per MB, which a loaded machine changes far less than the wall time:
"bare CPU / pipeline CPU" is how close the pipeline's work per MB comes to tiktoken's alone. Peak memory is
sampled every 50 ms over the process and all its descendants (the workers and the forkserver that starts
them): the total (PSS: a shared page split between the processes that share it), and the largest single
process's RSS. Runs alternate (bare N, pipeline N, for each
N) and each cell is the median of `--repeat` runs: on a shared machine compare the ratios, not the MB/s.
`--big=MB` adds one run of each at that size (the 1 GB row: memory flat in the input).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PIECE = 1 << 20
TICKS = os.sysconf("SC_CLK_TCK")


def corpus_path() -> Path:
    mirror = Path(os.environ.get("GPTFORGE_DATA_MIRROR") or ROOT.parent / "shared" / "data")
    path = mirror / "gutenberg" / "war_and_peace_pg2600.txt"
    if not path.is_file():
        sys.exit(
            f"benchmarks/prepare.py needs {path}: set GPTFORGE_DATA_MIRROR to a mirror like ../shared/data"
        )
    return path


def one(mode: str, procs: int, path: Path) -> dict:
    """Run one measurement in this process: the seconds of the timed part."""
    from gptforge.data.prepare import TextOptions, prepare_text
    from gptforge.tokenizer import gpt2_encoding

    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as out:
        if mode == "bare":
            encoding = gpt2_encoding(Path(os.environ["GPTFORGE_DATA_MIRROR"]))
            text = path.read_text(encoding="utf-8")
            pieces = [text[i : i + PIECE] for i in range(0, len(text), PIECE)]
            del text
            t0 = time.perf_counter()
            encoding.encode_ordinary_batch(pieces, num_threads=procs)
        else:
            options = TextOptions(input=str(path), data_dir=out, tokenizer="gpt2", num_proc=procs)
            t0 = time.perf_counter()
            prepare_text(options)
        return {"seconds": time.perf_counter() - t0}


def _tree(pid: int, cpu: dict[int, float]) -> tuple[int, int]:
    """Bytes resident in `pid` and all its descendants: the total (proportional: a page shared by k processes,
    such as the workers' copy-on-write pages of the forkserver, counts 1/k in each), and the largest RSS.
    Records each process's CPU seconds so far in `cpu`."""
    pss, rss, todo = [], [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                fields = dict(line.split()[:2] for line in f if line.split()[0] in ("Rss:", "Pss:"))
            rss.append(int(fields["Rss:"]) * 1024)
            pss.append(int(fields["Pss:"]) * 1024)
            with open(f"/proc/{p}/stat") as f:
                user, system = f.read().rsplit(")", 1)[1].split()[11:13]
            cpu[p] = (int(user) + int(system)) / TICKS
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (FileNotFoundError, ProcessLookupError, ValueError, KeyError):
            continue
    return sum(pss), max(rss, default=0)


def measure(mode: str, procs: int, path: Path) -> dict:
    """`one` in a child process, plus the peak RSS of that child and its descendants."""
    child = subprocess.Popen(
        [sys.executable, __file__, "--one", mode, str(procs), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    peak, cpu = [0, 0], {}

    def sample() -> None:
        while child.poll() is None:
            total, largest = _tree(child.pid, cpu)
            peak[0], peak[1] = max(peak[0], total), max(peak[1], largest)
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout = child.stdout.read()
    child.wait()
    sampler.join()
    if child.returncode != 0:
        sys.exit(f"{mode} {procs} on {path} failed (status {child.returncode})")
    result = json.loads(stdout)
    result["rss_total_mb"], result["rss_largest_mb"] = peak[0] / 2**20, peak[1] / 2**20
    result["cpu_seconds"] = sum(cpu.values())  # the whole process tree's, start-up included
    return result


def rows(path: Path, procs: list[int], repeat: int) -> None:
    megabytes = path.stat().st_size / 1e6
    runs: dict[tuple[str, int], list[dict]] = {(m, n): [] for n in procs for m in ("bare", "pipeline")}
    for _ in range(repeat):
        for n in procs:
            for mode in ("bare", "pipeline"):
                runs[mode, n].append(measure(mode, n, path))

    def rate(mode: str, n: int) -> float:
        return megabytes / statistics.median(r["seconds"] for r in runs[mode, n])

    for n in procs:
        # Runs of one round ran back to back: their ratio is the fairest comparison under shifting load.
        ratio = statistics.median(
            b["seconds"] / p["seconds"] for b, p in zip(runs["bare", n], runs["pipeline", n], strict=True)
        )
        base = procs[0]
        per_process = rate("pipeline", n) / n / (rate("bare", base) / base)
        speedup = rate("pipeline", n) / rate("pipeline", base) * base
        cpu = {
            m: statistics.median(r["cpu_seconds"] for r in runs[m, n]) / megabytes
            for m in ("bare", "pipeline")
        }
        total = max(r["rss_total_mb"] for r in runs["pipeline", n])
        largest = max(r["rss_largest_mb"] for r in runs["pipeline", n])
        print(
            f"| {megabytes:,.0f} | {n} | {rate('bare', n):.1f} | {rate('pipeline', n):.1f} | {ratio:.0%} "
            f"| {per_process:.0%} | {speedup:.2f}x | {cpu['bare']:.3f} | {cpu['pipeline']:.3f} "
            f"| {cpu['bare'] / cpu['pipeline']:.0%} | {total:.0f} | {largest:.0f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100", help="input sizes in MB")
    parser.add_argument("--procs", default="1,2", help="processes (bare: threads); the first is the base")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big", type=int, default=0, help="one more size in MB, run once")
    parser.add_argument("--one", nargs=3, metavar=("MODE", "PROCS", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one[0], int(args.one[1]), Path(args.one[2]))))
        return
    source = corpus_path()
    os.environ.setdefault("GPTFORGE_DATA_MIRROR", str(source.parent.parent))
    book = source.read_bytes()
    procs = [int(n) for n in args.procs.split(",")]
    print(f"# prepare text --tokenizer=gpt2 --num_proc=N vs bare tiktoken, {os.cpu_count()} cores")
    print(
        "| input MB | N | bare tiktoken MB/s (N threads) | pipeline MB/s (N processes) | pipeline / bare "
        f"| per process / bare {procs[0]} | speedup vs N={procs[0]} | bare CPU s/MB | pipeline CPU s/MB "
        "| bare CPU / pipeline CPU | peak PSS MB, all processes "
        "| peak RSS MB, largest process |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    sizes = [(int(s), args.repeat) for s in args.sizes.split(",")] + ([(args.big, 1)] if args.big else [])
    with tempfile.TemporaryDirectory() as tmp:
        for size, repeat in sizes:
            path = Path(tmp) / f"corpus-{size}mb.txt"
            with open(path, "wb") as f:
                for _ in range(size * 10**6 // len(book)):
                    f.write(book)
                rest = book[: size * 10**6 % len(book)]
                f.write(rest.decode("utf-8", "ignore").encode())  # whole characters
            rows(path, procs, repeat)
            path.unlink()


if __name__ == "__main__":
    main()
