"""Training throughput of `gptforge train` against nanoGPT's train.py on the CPU quick-start config.

    .venv/bin/python benchmarks/train.py --nanogpt=path/to/nanoGPT [--rounds=5] [--iters=300]
        [--variants=eager,compile,bf16,bf16+compile] [--variant="NAME=--key=value ..."] [--threads=N]
        [--quality=bf16+compile]

The config is nanoGPT's README quick start (shakespeare_char, 4 layers, 4 heads, 128 wide, block 64, batch 12,
dropout 0), which nanoGPT runs as

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000
        --lr_decay_iters=2000 --dropout=0.0

and gptforge as `gptforge train configs/quickstart_cpu.toml` (the same keys). Both train on the files of
`gptforge prepare shakespeare_char`, byte-identical to what nanoGPT's own prepare.py writes: the script links
them into DIR/data/shakespeare_char, with the meta.pkl nanoGPT reads its vocabulary size from, unless that
directory already holds them. nanoGPT's code stays in its own checkout and runs as a subprocess.

Each round runs every variant once for `--iters` iterations, in an order that rotates from round to round;
a variant's ms/iter is the median over all its iterations after the first `--warmup` of each run (compilation,
first touches), read from nanoGPT's "iter k: ... time X ms" lines and from gptforge's metrics.jsonl (`dt_ms`).
The ratio to nanoGPT is the median over rounds of the two medians' ratio, so a busy spell on a shared machine
hits both sides of a comparison. "p10" is the 10th percentile of the same iterations: close to what the step
costs when nothing else runs. "run s" is a whole run's wall time (start-up, compilation and evals included).
Each round line also gives the cores that other processes kept busy during each run (from /proc/stat): on a
shared machine, PyTorch's two OpenMP threads wait for each other whenever one is descheduled, so a step can
take 10x longer while others run. `--max_others=0.2` waits for a quiet machine before each run and redoes a
run that others disturbed (`--retries` times at most).

`--variant` adds a gptforge variant of your own (its options after the `=`), `--threads` sets OMP_NUM_THREADS
for both programs (default: PyTorch's, one thread per core).

With `--quality=VARIANT[,...]`, a full 2000-iteration run of each (eval_iters=200 unless
`--quality_eval_iters` says otherwise) follows and reports its val loss at iteration 2000 and its wall time;
`nanogpt` names nanoGPT's.
"""

import argparse
import filecmp
import json
import os
import pickle
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "quickstart_cpu.toml"
TOKENS_PER_ITER = 12 * 64  # batch_size x block_size
NANOGPT_ARGS = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20",
    "--log_interval=1", "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128",
    "--lr_decay_iters=2000", "--dropout=0.0",
]
# gptforge variants: the options each passes on top of the quick-start config
VARIANTS = {
    "eager": ["--dtype=float32", "--compile=False"],
    "compile": ["--dtype=float32", "--compile=True"],
    "bf16": ["--dtype=bfloat16", "--compile=False"],
    "bf16+compile": ["--dtype=bfloat16", "--compile=True"],
}
NANOGPT_ITER = re.compile(r"^iter (\d+): loss [-\d.naif]+, time ([\d.]+)ms", re.MULTILINE)
NANOGPT_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.MULTILINE)


def prepare_data(data_dir: Path) -> Path:
    """DATA_DIR/shakespeare_char from `gptforge prepare` (kept if it is there already)."""
    out = data_dir / "shakespeare_char"
    if not (out / "meta.json").is_file():
        command = [sys.executable, "-m", "gptforge", "prepare", "shakespeare_char", f"--data_dir={data_dir}"]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def link_nanogpt_data(nanogpt: Path, data: Path) -> None:
    """Give DIR/data/shakespeare_char what nanoGPT's prepare.py writes: train.bin, val.bin, meta.pkl."""
    target = nanogpt / "data" / "shakespeare_char"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("train.bin", "val.bin"):
        path = target / name
        if path.exists() and not path.is_symlink():
            if not filecmp.cmp(path, data / name, shallow=False):
                sys.exit(f"{path} differs from gptforge's {data / name}; move it away and run again")
            continue
        path.unlink(missing_ok=True)
        path.symlink_to(data / name)
    if not (target / "meta.pkl").exists():
        chars = json.loads((data / "meta.json").read_text())["tokenizer"]["chars"]
        stoi = {c: i for i, c in enumerate(chars)}
        meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}
        with open(target / "meta.pkl", "wb") as f:
            pickle.dump(meta, f)


def run_nanogpt(nanogpt: Path, iters: int, eval_iters: int, out_dir: Path) -> dict:
    """nanoGPT's quick start for `iters` iterations: per-iteration ms, evals, wall seconds."""
    args = [a if not a.startswith("--eval_iters=") else f"--eval_iters={eval_iters}" for a in NANOGPT_ARGS]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "train.py", *args, f"--max_iters={iters}", f"--out_dir={out_dir}"],
                          cwd=nanogpt, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"nanoGPT's train.py failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    dt = {int(it): float(ms) for it, ms in NANOGPT_ITER.findall(proc.stdout)}
    evals = {int(it): float(val) for it, _, val in NANOGPT_EVAL.findall(proc.stdout)}
    return {"dt_ms": dt, "val_loss": evals, "wall_s": wall}


def run_gptforge(options: list[str], data_dir: Path, iters: int, eval_iters: int, out_dir: Path) -> dict:
    """`gptforge train configs/quickstart_cpu.toml` for `iters` iterations:
    per-iteration ms, evals, wall s."""
    command = [sys.executable, "-m", "gptforge", "train", str(CONFIG), f"--data_dir={data_dir}",
               f"--out_dir={out_dir}", f"--max_iters={iters}", f"--eval_iters={eval_iters}", *options]
    t0 = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"gptforge train {' '.join(options)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    dt = {r["iter"]: r["dt_ms"] for r in records if "dt_ms" in r}
    evals = {r["iter"]: r["val_loss"] for r in records if "val_loss" in r}
    return {"dt_ms": dt, "val_loss": evals, "wall_s": wall}


def steady(run: dict, warmup: int) -> list[float]:
    return [ms for it, ms in run["dt_ms"].items() if it >= warmup]


def busy_seconds() -> float:
    """CPU seconds this machine has been busy, all processes together (0 where /proc/stat is missing)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def with_others_load(fn, *args) -> dict:
    """`fn(*args)`, plus how many cores other processes kept busy meanwhile: the noise of that run."""
    busy, mine = busy_seconds(), children_seconds()
    result = fn(*args)
    others = (busy_seconds() - busy) - (children_seconds() - mine)
    return {**result, "others": max(0.0, others) / result["wall_s"]}


def wait_for_quiet(max_others: float, timeout: float = 600.0) -> None:
    """Wait (at most `timeout` s) until other processes keep no more than `max_others` cores busy for 2 s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy, t0 = busy_seconds(), time.monotonic()
        time.sleep(2.0)
        if (busy_seconds() - busy) / (time.monotonic() - t0) <= max_others:
            return


def print_table(runs: dict[str, list[dict]], warmup: int) -> None:
    """Median ms/iter and tokens/s of each program,
    and its speed relative to nanoGPT's run of the same round."""
    print("| variant | ms/iter (median) | tokens/s | ms/iter (p10) | run s (median) "
          "| vs nanoGPT (median of rounds) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, ones in runs.items():
        all_ms = sorted(ms for one in ones for ms in steady(one, warmup))
        ms, p10 = statistics.median(all_ms), all_ms[len(all_ms) // 10]
        wall = statistics.median(one["wall_s"] for one in ones)
        ratio = ""
        if "nanogpt" in runs and name != "nanogpt":
            ratio = statistics.median(
                statistics.median(steady(base, warmup)) / statistics.median(steady(one, warmup))
                for base, one in zip(runs["nanogpt"], ones, strict=True)
            )
            ratio = f"{ratio:.2f}x"
        label = "nanoGPT train.py" if name == "nanogpt" else f"gptforge {name} ({' '.join(VARIANTS[name])})"
        tokens_per_sec = TOKENS_PER_ITER / ms * 1000
        print(f"| {label} | {ms:.1f} | {tokens_per_sec:,.0f} | {p10:.1f} | {wall:.0f} | {ratio} |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt", type=Path,
                        help="a nanoGPT checkout (train.py, model.py, configurator.py)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="an extra gptforge variant, e.g. 'erf=--compile=True --gelu_approximate=none'")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both programs")
    parser.add_argument("--max_others", type=float,
                        help="start each run when other processes keep at most this many cores busy, "
                             "and redo it if they kept more busy during it")
    parser.add_argument("--retries", type=int, default=3, help="with --max_others: redos of a run at most")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=300, help="iterations per run")
    parser.add_argument("--warmup", type=int, default=20, help="first iterations of a run left out")
    parser.add_argument("--quality", default="", help="variants (or nanogpt) to train for 2000 iterations")
    parser.add_argument("--quality_eval_iters", type=int, default=200,
                        help="eval batches of the quality runs")
    parser.add_argument("--data_dir", type=Path, help="where shakespeare_char is (or gets) prepared")
    args = parser.parse_args()
    for spec in args.variant:
        name, _, options = spec.partition("=")
        VARIANTS[name] = options.split()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by both programs
    named = [v for v in args.variants.split(",") if v] + [spec.partition("=")[0] for spec in args.variant]
    variants = list(dict.fromkeys(named))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        sys.exit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if args.nanogpt is not None and not (args.nanogpt / "train.py").is_file():
        sys.exit(f"--nanogpt={args.nanogpt} has no train.py; point it at a nanoGPT checkout")

    with tempfile.TemporaryDirectory(prefix="gptforge-bench-train-") as tmp:
        data = prepare_data(args.data_dir or Path(tmp) / "data")
        names = (["nanogpt"] if args.nanogpt else []) + variants
        if args.nanogpt:
            link_nanogpt_data(args.nanogpt.resolve(), data.resolve())

        def run(name: str, iters: int, eval_iters: int) -> dict:
            for _ in range(args.retries + 1):
                if args.max_others is not None:
                    wait_for_quiet(args.max_others)
                out = Path(tempfile.mkdtemp(dir=tmp))
                if name == "nanogpt":
                    one = with_others_load(run_nanogpt, args.nanogpt.resolve(), iters, eval_iters, out)
                else:
                    one = with_others_load(run_gptforge, VARIANTS[name], data.parent, iters, eval_iters, out)
                if args.max_others is None or one["others"] <= args.max_others:
                    break
            return one

        threads = args.threads or torch.get_num_threads()
        print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
              f"{threads} thread(s); {args.rounds} rounds x {args.iters} iters, "
              f"the first {args.warmup} of each run left out",
              flush=True)
        runs: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                runs[name].append(run(name, args.iters, eval_iters=20))
            print(f"round {r + 1}: " + ", ".join(
                f"{n} {statistics.median(steady(runs[n][-1], args.warmup)):.1f} ms "
                f"(others {runs[n][-1]['others']:.1f} cores)" for n in names), flush=True)

        if args.rounds:
            print_table(runs, args.warmup)

        for name in filter(None, args.quality.split(",")):
            if name not in VARIANTS and not (name == "nanogpt" and args.nanogpt):
                sys.exit(f"--quality={name}: not a variant (or nanogpt without --nanogpt)")
            one = run(name, 2000, eval_iters=args.quality_eval_iters)
            ms = statistics.median(steady(one, args.warmup))
            print(f"quality {name}: val loss {one['val_loss'][2000]:.4f} at iter 2000 "
                  f"(eval_iters={args.quality_eval_iters}), "
                  f"{one['wall_s']:.0f} s wall, median {ms:.1f} ms/iter, others {one['others']:.1f} cores",
                  flush=True)


if __name__ == "__main__":
    main()
