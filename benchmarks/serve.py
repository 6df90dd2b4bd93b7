"""`gptforge serve` under load: aggregate tokens/s and time to first token at several concurrencies, and
what one decode step costs at each size.

    python benchmarks/serve.py [--concurrency=1,4,16] [--rounds=3] [--max_tokens=64] [--threads=N]
                               [--modes=invariant,fast] [--repeats=3] [--steps]

A GPT-2 124M-shaped model with random weights (12 layers, 12 heads, 768 wide, 50257 tokens, 1024 positions) is
saved as a Hugging Face directory and served by the real command in a subprocess on 127.0.0.1, one server per
batching mode, all started at once: `invariant` (the default: a step computes the busy slots padded to the
smallest step size that holds them, sizes at which every row rounds as in a step of all 16) and `fast`
(--batch_invariant=False, only the busy slots). At each concurrency C, C streaming clients each send `rounds`
requests one after another (seeded, temperature 1, `max_tokens` each); tokens/s counts every completion token
over the level's wall time, and the time to first token runs from sending a request to its first text chunk.
The levels and modes are interleaved `repeats` times (the modes in turn first), so that a busy machine slows
all alike: the tables give medians, and each mode's tokens/s against `fast`'s at the same concurrency is the
median of the ratios of one repeat.

`--steps` first times one decode step of the same model in this process at 1, 2, 4, 8 and 16 rows
(interleaved, the median of 20), and says at which sizes every row rounds bit for bit as at 16
(`serve.engine.invariant_step_sizes`): what a lone request costs under each way of batching.
"""

import argparse
import asyncio
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from gptforge import GPT, GPTConfig
from gptforge.kv_cache import SlotKVCache
from gptforge.serve.engine import invariant_step_sizes

PROMPT = (
    "The meaning of life is a question that philosophers and scientists have argued about for centuries, and"
)
MODES = {"invariant": [], "fast": ["--batch_invariant=False"]}
SLOTS = 16  # the server's default --max_batch
STEP_SIZES = (1, 2, 4, 8, 16)


async def one_client(url: str, seed: int, rounds: int, max_tokens: int) -> list[tuple[float, int]]:
    """(time to first token, completion tokens) of each of the client's requests."""
    results = []
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        for i in range(rounds):
            body = {"prompt": PROMPT, "max_tokens": max_tokens, "seed": seed * 1000 + i, "stream": True,
                    "stream_options": {"include_usage": True}}
            start, first, tokens = time.perf_counter(), None, 0
            async with client.stream("POST", "/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    chunk = json.loads(line.removeprefix("data: "))
                    if chunk["choices"] and first is None:
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
            results.append((first, tokens))
    return results


async def level(url: str, concurrency: int, rounds: int, max_tokens: int) -> dict[str, float]:
    start = time.perf_counter()
    per_client = await asyncio.gather(*(one_client(url, c, rounds, max_tokens) for c in range(concurrency)))
    seconds = time.perf_counter() - start
    results = [r for client in per_client for r in client]
    ttft = np.array([first for first, _ in results]) * 1000
    return {"requests": len(results), "tokens": sum(t for _, t in results), "seconds": seconds,
            "tokens_per_s": sum(t for _, t in results) / seconds,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95))}


def start_server(model_dir: Path, extra: list[str]) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gptforge", "serve", f"--init_from={model_dir}", "--port=0", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    banner = process.stdout.readline()
    match = re.search(r"http://127\.0\.0\.1:\d+", banner)
    if match is None:
        process.kill()
        raise SystemExit(f"the server did not start: {banner!r}")
    url = match.group(0)
    while True:  # the banner comes as the socket binds; the app is up once /health answers
        try:
            httpx.get(f"{url}/health").raise_for_status()
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


@torch.inference_mode()
def step_costs(model: GPT, repeats: int = 20) -> None:
    """The median time of one decode step at each of STEP_SIZES rows (18 cached positions per slot), and
    whether its rows round as at SLOTS."""
    cache = SlotKVCache(model.config, SLOTS, torch.float32)
    invariant = invariant_step_sizes(model, cache)
    model(torch.randint(0, model.config.vocab_size, (1, 18)), kv_cache=cache.slot(0))
    cache.occupy(0, 18)
    for slot in range(1, SLOTS):
        cache.copy(0, slot)
    times: dict[int, list[float]] = {size: [] for size in STEP_SIZES}
    for _ in range(repeats):
        for size in STEP_SIZES:
            cache.rows = list(range(size))
            start = time.perf_counter()
            model(torch.zeros(size, 1, dtype=torch.long), kv_cache=cache)
            times[size].append(time.perf_counter() - start)
            for slot in cache.rows:
                cache.occupy(slot, 18)
    one = float(np.median(times[1]))
    print(f"step sizes at which every row rounds as at {SLOTS}: {invariant}\n")
    print("| rows | ms per step | vs 1 row | rounds as at 16 rows |")
    print("| ---: | ---: | ---: | --- |")
    for size, values in times.items():
        ms = float(np.median(values))
        print(f"| {size} | {ms * 1000:.1f} | {ms / one:.2f}x | {'yes' if size in invariant else 'no'} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", default="invariant,fast")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", action="store_true", help="first time one decode step at each size")
    args = parser.parse_args()
    levels, modes = [int(c) for c in args.concurrency.split(",")], args.modes.split(",")
    threads = args.threads or torch.get_num_threads()
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads, "
          f"{time.strftime('%Y-%m-%d')}; {args.rounds} requests per client of {args.max_tokens} tokens, "
          f"{args.repeats} repeats\n")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)).eval()
        model.to_hf(tmp)
        if args.steps:
            torch.set_num_threads(threads)
            step_costs(model)
        del model
        servers = {mode: start_server(Path(tmp), [*MODES[mode], f"--threads={threads}"]) for mode in modes}
        results: dict[tuple[str, int], list[dict[str, float]]] = {(m, c): [] for m in modes for c in levels}
        try:
            for _, url in servers.values():
                asyncio.run(level(url, 1, 1, 8))  # warm up
            for repeat in range(args.repeats):
                for concurrency in levels:
                    for mode in modes[repeat % len(modes):] + modes[:repeat % len(modes)]:
                        r = asyncio.run(level(servers[mode][1], concurrency, args.rounds, args.max_tokens))
                        results[mode, concurrency].append(r)
                        print(f"# repeat {repeat + 1}: {mode} at {concurrency}: "
                              f"{r['tokens_per_s']:.1f} tokens/s", file=sys.stderr, flush=True)
        finally:
            for process, _ in servers.values():
                process.terminate()
                process.wait()
    print("| mode | concurrency | requests | tokens/s | vs fast | vs concurrency 1 | TTFT p50 (ms) "
          "| TTFT p95 (ms) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for mode in modes:
        for concurrency in levels:
            runs = results[mode, concurrency]
            rate = float(np.median([r["tokens_per_s"] for r in runs]))
            base = float(np.median([r["tokens_per_s"] for r in results[mode, levels[0]]]))
            against = ""
            if "fast" in modes:
                pairs = zip(runs, results["fast", concurrency], strict=True)
                against = f"{np.median([r['tokens_per_s'] / f['tokens_per_s'] for r, f in pairs]):.2f}x"
            print(f"| {mode} | {concurrency} | {runs[0]['requests']} | {rate:.1f} | {against} | "
                  f"{rate / base:.2f}x | {np.median([r['ttft_p50'] for r in runs]):.0f} | "
                  f"{np.median([r['ttft_p95'] for r in runs]):.0f} |")


if __name__ == "__main__":
    main()
