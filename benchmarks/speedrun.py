"""Time to a target val loss: a baseline config against a speedrun preset, trained one after the other.

    .venv/bin/python benchmarks/speedrun.py [--baseline=configs/quickstart_cpu.toml]
        [--speedrun=configs/speedrun_shakespeare_char_cpu.toml] [--target=1.886] [--evals=20] [--rounds=1]
        [--threads=N] [--data_dir=DIR] [--work_dir=DIR]
    .venv/bin/python benchmarks/speedrun.py --ablate [--budget_s=60] [--only=rope,muon] [--threads=N]

Each run is `gptforge train CONFIG` in a subprocess with `--eval_iters=200` (so a lucky small eval cannot
count) and an `eval_interval` of the config's `max_iters / --evals`, so both runs are evaluated about as often
over their own length. Times are the run's `elapsed_s` from its metrics.jsonl: training steps only, evals and
checkpoints excluded. The script prints each run's val loss against elapsed seconds and tokens seen, the time
each first reaches `--target` (at an eval; a run that never does shows "-"), the ratio of the two (a baseline
that never reaches the target is timed at its end, marked "end": the speedrun must beat its whole run), and
both val losses at equal wall time: the speedrun's end, with the baseline's curve interpolated linearly
between evals. `--rounds=N` repeats the pair, alternating which goes first.

`--ablate` trains the baseline and the baseline with each option of ABLATIONS alone switched on, for the same
wall-clock budget each: a short probe run first measures the variant's ms/iter, then its `max_iters` and
`lr_decay_iters` are set to fit `--budget_s`, and the table gives the final val loss (eval_iters=200).

On a shared machine, PyTorch's OpenMP threads wait for each other whenever another process takes a core, which
can slow a step 3x; `--threads=1` (OMP_NUM_THREADS for every run) keeps the comparison stable there.
Data: `gptforge prepare shakespeare_char` into `--data_dir` unless it is there (GPTFORGE_DATA_MIRROR applies).
"""

import argparse
import itertools
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from gptforge.config import load_train_config
from gptforge.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "configs" / "quickstart_cpu.toml"
SPEEDRUN = ROOT / "configs" / "speedrun_shakespeare_char_cpu.toml"
EVAL_ITERS = 200
# each option alone on top of the baseline config
ABLATIONS = {
    "baseline": [],
    "rope": ["--pos_emb=rope"],
    "rmsnorm": ["--norm=rmsnorm"],
    "relu2": ["--mlp=relu2"],
    "swiglu": ["--mlp=swiglu"],
    "qk_norm": ["--qk_norm=True"],
    "untied head": ["--tie_embeddings=False"],
    "softcap 15": ["--logit_softcap=15"],
    "zero_init_proj": ["--zero_init_proj=True"],
    "muon": ["--optimizer=muon"],
    "wsd": ["--lr_schedule=wsd"],
}


def prepare_data(data_dir: Path, dataset: str) -> None:
    if not (data_dir / dataset / "meta.json").is_file():
        subprocess.run([sys.executable, "-m", "gptforge", "prepare", dataset, f"--data_dir={data_dir}"],
                       check=True, stdout=subprocess.DEVNULL)


def train(config: Path, out_dir: Path, options: list[str], data_dir: Path, threads: int | None) -> list[dict]:
    """`gptforge train CONFIG OPTIONS` into `out_dir`; its metrics records.
    Output goes to out_dir/train.log."""
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    log = out_dir / "train.log"
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "gptforge", "train", str(config),
                               f"--data_dir={data_dir}", f"--out_dir={out_dir}",
                               "--always_save_checkpoint=False", *options],
                              stdout=f, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"gptforge train {config} {' '.join(options)} failed:\n{log.read_text()[-3000:]}")
    return read_metrics(out_dir / "metrics.jsonl")


def tokens_per_iter(config: Path, options: list[str]) -> int:
    cfg = load_train_config([str(config)], dict(o[2:].split("=", 1) for o in options))
    return cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps


def curve(records: list[dict]) -> list[tuple[int, float, float]]:
    """(iter, elapsed_s, val_loss) of every eval."""
    return [(r["iter"], r["elapsed_s"], r["val_loss"]) for r in records if "val_loss" in r]


def first_reach(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(iter, elapsed_s) of the first eval at or below `target`."""
    return next(((it, t) for it, t, loss in points if loss <= target), None)


def loss_at(points: list[tuple[int, float, float]], t: float) -> float | None:
    """Val loss at elapsed time `t`, linear between evals; None past the run's end."""
    for (_, t0, l0), (_, t1, l1) in itertools.pairwise(points):
        if t0 <= t <= t1:
            return l0 if t1 == t0 else l0 + (t - t0) / (t1 - t0) * (l1 - l0)
    return None


def machine(threads: int | None) -> str:
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), cpu)
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    extras = [name for flag, name in (("avx512f", "AVX-512"), ("amx_bf16", "AMX-BF16")) if flag in flags]
    return (f"{cpu} ({', '.join(extras) or 'no AVX-512'}), {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {threads or torch.get_num_threads()} thread(s) per run")


def side_by_side(args: argparse.Namespace, data_dir: Path, work: Path) -> None:
    runs, tokens = {}, {}
    for name, config in (("baseline", Path(args.baseline)), ("speedrun", Path(args.speedrun))):
        interval = max(1, load_train_config([str(config)], {}).max_iters // args.evals)
        runs[name] = (config, [f"--eval_iters={EVAL_ITERS}", f"--eval_interval={interval}",
                               "--log_interval=50"])
        tokens[name] = tokens_per_iter(config, runs[name][1])
    results: dict[str, list[list[tuple[int, float, float]]]] = {name: [] for name in runs}
    for round_ in range(args.rounds):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            config, options = runs[name]
            print(f"round {round_ + 1}: {name} ({config.name}) ...", flush=True)
            records = train(config, work / f"{name}-{round_}", options, data_dir, args.threads)
            results[name].append(curve(records))

    print(f"\n{machine(args.threads)}; target val loss {args.target}, eval_iters={EVAL_ITERS}\n")
    for round_ in range(args.rounds):
        if args.rounds > 1:
            print(f"## round {round_ + 1}")
        for name, (config, _) in runs.items():
            print(f"{name}: {config.relative_to(ROOT) if config.is_relative_to(ROOT) else config} "
                  f"({tokens[name]} tokens/iter)")
            print("| iter | elapsed s | tokens | val loss |\n|---:|---:|---:|---:|")
            for it, t, loss in results[name][round_]:
                print(f"| {it} | {t:.1f} | {it * tokens[name]:,} | {loss:.4f} |")
            print()
    print("| round | baseline s to target | speedrun s to target | ratio | at speedrun's end (s) "
          "| baseline val | speedrun val |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for round_ in range(args.rounds):
        base, fast = results["baseline"][round_], results["speedrun"][round_]
        b, s = first_reach(base, args.target), first_reach(fast, args.target)
        base_time = f"{b[1]:.1f} (iter {b[0]})" if b else f"> {base[-1][1]:.1f} (end: {base[-1][2]:.4f})"
        b = b or (base[-1][0], base[-1][1])
        ratio = s[1] / b[1] if s else None
        if ratio is not None:
            ratios.append(ratio)
        end = fast[-1][1]
        base_loss = loss_at(base, end)
        print(f"| {round_ + 1} | {base_time} "
              f"| {f'{s[1]:.1f} (iter {s[0]})' if s else '-'} | {f'{ratio:.2f}' if ratio else '-'} "
              f"| {end:.1f} | {f'{base_loss:.4f}' if base_loss is not None else '-'} | {fast[-1][2]:.4f} |")
    if len(ratios) > 1:
        print(f"\nmedian ratio over {len(ratios)} rounds: {statistics.median(ratios):.2f}")


def ablate(args: argparse.Namespace, data_dir: Path, work: Path) -> None:
    names = (list(ABLATIONS) if not args.only
             else ["baseline", *[n for n in args.only.split(",") if n != "baseline"]])
    unknown = [n for n in names if n not in ABLATIONS]
    if unknown:
        sys.exit(f"unknown ablation(s) {unknown}; choose from {', '.join(ABLATIONS)}")
    config = Path(args.baseline)
    rows = []
    for name in names:
        slug = name.replace(" ", "_")
        probe = train(config, work / f"probe-{slug}", [*ABLATIONS[name], f"--max_iters={args.probe_iters}",
                                                        "--eval_iters=1", "--log_interval=1"],
                      data_dir, args.threads)
        ms = statistics.median(r["dt_ms"] for r in probe if "dt_ms" in r and r["iter"] >= 5)
        iters = max(1, int(args.budget_s * 1000 / ms))
        options = [*ABLATIONS[name], f"--max_iters={iters}", f"--lr_decay_iters={iters}",
                   f"--eval_iters={EVAL_ITERS}", f"--eval_interval={iters}", "--log_interval=50"]
        print(f"{name}: {ms:.1f} ms/iter -> {iters} iters ...", flush=True)
        points = curve(train(config, work / f"ablate-{slug}", options, data_dir, args.threads))
        rows.append((name, " ".join(ABLATIONS[name]) or "-", ms, iters, points[-1][1], points[-1][2]))
    base = rows[0][5]
    print(f"\n{machine(args.threads)}; {config.name} + each option alone, {args.budget_s:g} s of training "
          f"each, eval_iters={EVAL_ITERS}\n")
    print("| variant | options | ms/iter | iters | elapsed s | val loss | vs baseline |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, options, ms, iters, elapsed, loss in rows:
        print(f"| {name} | `{options}` | {ms:.1f} | {iters} | {elapsed:.1f} | {loss:.4f} "
              f"| {loss - base:+.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--baseline", default=str(BASELINE))
    parser.add_argument("--speedrun", default=str(SPEEDRUN))
    parser.add_argument("--target", type=float, default=1.886, help="val loss to reach")
    parser.add_argument("--evals", type=int, default=20,
                        help="evals per run (eval_interval = max_iters / evals)")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the pair, alternating the order")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS of every run (default: torch's)")
    parser.add_argument("--ablate", action="store_true",
                        help="each option alone at a fixed wall-clock budget")
    parser.add_argument("--budget_s", type=float, default=60.0,
                        help="--ablate: seconds of training per variant")
    parser.add_argument("--probe_iters", type=int, default=30, help="--ablate: iterations timed per variant")
    parser.add_argument("--only", default="",
                        help="--ablate: comma-separated variants (the baseline always runs)")
    parser.add_argument("--data_dir", default=None,
                        help="where shakespeare_char is or goes (default: a temp dir)")
    parser.add_argument("--work_dir", default=None, help="run directories (default: a temp dir, removed)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="gptforge-speedrun-") as tmp:
        data_dir = Path(args.data_dir or Path(tmp) / "data")
        work = Path(args.work_dir or Path(tmp) / "runs")
        prepare_data(data_dir, load_train_config([args.baseline], {}).dataset)
        if args.ablate:
            ablate(args, data_dir, work)
        else:
            side_by_side(args, data_dir, work)


if __name__ == "__main__":
    main()
