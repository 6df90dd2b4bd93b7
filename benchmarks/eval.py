"""Scoring throughput of `gptforge eval` against a bare forward pass over the same tokens.

    python benchmarks/eval.py [--init_from=gpt2|DIR] [--tasks=hellaswag,lambada,wikitext2] [--limit=100]
        [--rounds=3] [--batch_size=32] [--device=cpu] [--dtype=float32] [--threads=N]

For each task the script builds the task's requests once (from the mirror's files), then alternates,
`--rounds` times: the scorer over every request (padding, the head at the scored positions, log-softmax,
greedy check, per-request sums back on the host), and the model's own forward, `model(inputs, targets)` with
logits at every position and the loss, over exactly the same padded batches. Both count the same tokens: the
positions of the requests, not the padding. The ratio of the medians is the scorer's throughput as a share of
the bare forward's. Without --init_from the model is GPT-2 124M-shaped with random weights (scores are then
meaningless, speeds are not); tokenizing the task's text is timed separately and reported, not counted in
either rate.
"""

import argparse
import os
import platform
import statistics
import time
from datetime import date

import torch

from gptforge import GPT, GPTConfig
from gptforge.device import resolve_device, resolve_dtype
from gptforge.evaluate import TASK_FUNCTIONS, EvalOptions, Request, Scorer, TaskInputs
from gptforge.source import Source, load_source
from gptforge.tokenizer import GPT2Tokenizer


def time_scorer(scorer: Scorer, groups: list[list[Request]]) -> float:
    t0 = time.perf_counter()
    scorer.score(groups)
    return time.perf_counter() - t0


@torch.no_grad()
def time_bare(scorer: Scorer, groups: list[list[Request]]) -> float:
    groups = scorer.fit(groups)
    batches = [scorer.tensors([r for i in batch for r in groups[i]]) for batch in scorer.batches(groups)]
    device_type = torch.device(scorer.device).type
    t0 = time.perf_counter()
    with torch.autocast(device_type, scorer.dtype, enabled=scorer.dtype != torch.float32):
        for x, y in batches:
            _, loss = scorer.model(x, y)
            loss.item()  # wait for the device
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--init_from", help="gpt2*, or a model directory (default: random GPT-2 124M shape)")
    parser.add_argument("--tasks", default="hellaswag,lambada,wikitext2")
    parser.add_argument("--limit", type=int, default=100, help="examples per task (windows for wikitext2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads (default: one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.init_from:
        source = load_source(args.init_from)
    else:
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768))
        source = Source(model, GPT2Tokenizer(), None, "random GPT-2 124M shape")
    scorer = Scorer(source.model, device, dtype, args.batch_size, progress=False)
    name = (
        torch.cuda.get_device_name() if device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    print(f"# {date.today()}, {name}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {source.name}, {device} {dtype}, batch_size {args.batch_size}")
    print("| task | examples | tokens | tokenize s | scorer tok/s | bare forward tok/s | scorer / bare |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for task in args.tasks.split(","):
        opts = EvalOptions(task=task, limit=args.limit, progress=False)
        t0 = time.perf_counter()
        groups, _ = TASK_FUNCTIONS[task](TaskInputs(source, opts))
        tokenize = time.perf_counter() - t0
        tokens = sum(len(r.tokens) - 1 for g in scorer.fit(groups) for r in g)
        time_scorer(scorer, groups[:4])  # warm-up: first-touch allocations, kernel selection
        scored, bare = [], []
        for _ in range(args.rounds):
            scored.append(time_scorer(scorer, groups))
            bare.append(time_bare(scorer, groups))
        s, b = tokens / statistics.median(scored), tokens / statistics.median(bare)
        print(f"| {task} | {len(groups):,} | {tokens:,} | {tokenize:.2f} | {s:,.0f} | {b:,.0f} "
              f"| {s / b:.0%} |", flush=True)


if __name__ == "__main__":
    main()
