"""`gptforge serve` under load: aggregate tokens/s and time to first token at several concurrencies.

    python benchmarks/serve.py [--concurrency=1,4,16] [--rounds=3] [--max_tokens=64] [--threads=N]
                               [--modes=invariant,fast]

A GPT-2 124M-shaped model with random weights (12 layers, 12 heads, 768 wide, 50257 tokens, 1024 positions) is
saved as a Hugging Face directory and served by the real command in a subprocess on 127.0.0.1, once per
batching mode: `invariant` (the default, every step computes all 16 slots) and `fast`
(--batch_invariant=False, only the busy ones). At each concurrency C, C streaming clients each send `rounds`
requests one after another (seeded, temperature 1, `max_tokens` each); tokens/s counts every completion token
over the level's wall time, and the time to first token runs from sending a request to its first text chunk.
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

PROMPT = (
    "The meaning of life is a question that philosophers and scientists have argued about for centuries, and"
)
MODES = {"invariant": [], "fast": ["--batch_invariant=False"]}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--modes", default="invariant,fast")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    threads = args.threads or torch.get_num_threads()
    print(f"# {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, {threads} threads, "
          f"{time.strftime('%Y-%m-%d')}; {args.rounds} requests per client of {args.max_tokens} tokens")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        GPT(GPTConfig(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, block_size=1024)).to_hf(tmp)
        print("| mode | concurrency | requests | tokens/s | vs concurrency 1 "
              "| TTFT p50 (ms) | TTFT p95 (ms) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
        for mode in args.modes.split(","):
            process, url = start_server(Path(tmp), [*MODES[mode], f"--threads={threads}"])
            try:
                asyncio.run(level(url, 1, 1, 8))  # warm up
                base = None
                for concurrency in levels:
                    r = asyncio.run(level(url, concurrency, args.rounds, args.max_tokens))
                    base = base or r["tokens_per_s"]
                    print(f"| {mode} | {concurrency} | {r['requests']} | {r['tokens_per_s']:.1f} | "
                          f"{r['tokens_per_s'] / base:.2f}x | {r['ttft_p50']:.0f} | {r['ttft_p95']:.0f} |",
                          flush=True)
            finally:
                process.terminate()
                process.wait()


if __name__ == "__main__":
    main()
