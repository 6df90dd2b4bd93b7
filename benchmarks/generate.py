"""Decoding speed of a GPT-2 124M-shaped model (random weights, batch 1) against the weight-streaming floor.

    python benchmarks/generate.py [--threads=2] [--new_tokens=256] [--prompt_len=16]

A batch-1 decode step must read every weight once, so one pass of matrix-vector products over the same
matrices (in the model's layout) bounds tokens/s from above: the floor rows. Every configuration is timed
in this one run, so ratios hold even on a noisy machine.
"""

import argparse
import platform
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptforge import GPT, GPTConfig
from gptforge.generate import optimize_for_decoding
from gptforge.model import KVCache

CONTEXTS = (16, 256, 512, 1000)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def floor_seconds(model: GPT) -> float:
    """One matrix-vector product with every matmul weight of the model: the least a decode step reads."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    dtype = weights[0].dtype
    vectors = {n: torch.randn(1, 1, n, dtype=dtype) for n in {w.size(1) for w in weights}}

    def one_pass() -> None:
        for w in weights:
            F.linear(vectors[w.size(1)], w)

    with torch.inference_mode():
        one_pass()
        return best_time(one_pass, repeats=5)


def layout_bandwidth(shape: tuple[int, int], transposed: bool, total_bytes: int = 400_000_000) -> float:
    """GB/s of matrix-vector products with fp32 (out, in) matrices stored as nn.Linear does or transposed.

    Enough copies to exceed any cache, so the matrices stream from memory as in a real decode step.
    """
    copies = max(2, total_bytes // (shape[0] * shape[1] * 4))
    weights = [torch.randn(shape) for _ in range(copies)]
    if transposed:
        weights = [w.t().contiguous().t() for w in weights]
    x = torch.randn(1, 1, shape[1])

    def one_pass() -> None:
        for w in weights:
            F.linear(x, w)

    one_pass()
    return copies * shape[0] * shape[1] * 4 / best_time(one_pass, repeats=3) / 1e9


def generate_rate(model: GPT, prompt: torch.Tensor, new_tokens: int, use_cache: bool) -> float:
    """Tokens/s of a whole greedy `generate` call, prompt processing included."""
    t0 = time.perf_counter()
    model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
    return new_tokens / (time.perf_counter() - t0)


@torch.inference_mode()
def step_ms(model: GPT, context: int, use_cache: bool, steps: int) -> float:
    """Milliseconds per new token once `context` tokens are in place (prefill excluded)."""
    idx = torch.randint(0, model.config.vocab_size, (1, context))
    if not use_cache:
        window = idx[:, -model.config.block_size :]
        model(window)  # warm-up
        return best_time(lambda: model(window), repeats=steps) * 1000
    cache = KVCache(model.config, 1)
    model(idx[:, :-1], kv_cache=cache)
    token = idx[:, -1:]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        model(token, kv_cache=cache)
        times.append(time.perf_counter() - t0)
        cache.pos -= 1  # measure this context length again, not a growing one
    return min(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per context length")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompt = torch.randint(0, 50304, (1, args.prompt_len))

    base = GPT(GPTConfig()).eval()  # GPT-2 124M shape, vocab 50304, fp32
    fast = optimize_for_decoding(GPT(GPTConfig()).eval())
    bf16 = GPT(GPTConfig()).eval().to(torch.bfloat16)
    rows = [
        ("use_cache=False (recompute, nanoGPT)", base, False),
        ("use_cache=True", base, True),
        ("use_cache=True, optimize_for_decoding", fast, True),
        ("use_cache=True, bf16 weights", bf16, True),
    ]
    print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"torch {torch.__version__}")
    print(f"# {args.prompt_len}-token prompt, {args.new_tokens} new tokens, batch 1, greedy")
    header = (f"| {'configuration':<42} | {'tokens/s':>8} | "
              + " | ".join(f"ms/tok @{c:>4}" for c in CONTEXTS) + " |")
    print(header)
    print("|" + "|".join("-" * (len(col) + 0) for col in header.split("|")[1:-1]) + "|")
    results = {}
    for name, model, use_cache in rows:
        model.generate(prompt, 4, temperature=0, use_cache=use_cache)  # warm-up
        rate = generate_rate(model, prompt, args.new_tokens, use_cache)
        steps = args.steps if use_cache else 2
        ms = [step_ms(model, c, use_cache, steps) for c in CONTEXTS]
        results[name] = rate
        print(f"| {name:<42} | {rate:>8.1f} | " + " | ".join(f"{m:>11.1f}" for m in ms) + " |")
    for name, model in (("floor: weight streaming, nn.Linear layout", base),
                        ("floor: weight streaming, decoding layout", fast),
                        ("floor: weight streaming, bf16", bf16)):
        s = floor_seconds(model)
        results[name] = 1 / s
        print(f"| {name:<42} | {1 / s:>8.1f} | " + " | ".join(f"{s * 1000:>11.1f}" for _ in CONTEXTS) + " |")

    print("\n| matrix (out, in) | nn.Linear layout GB/s | transposed layout GB/s |")
    print("|---|---|---|")
    for name, shape in (("c_attn", (2304, 768)), ("attn.c_proj", (768, 768)), ("c_fc", (3072, 768)),
                        ("mlp.c_proj", (768, 3072)), ("lm_head", (50304, 768))):
        print(f"| {name} {shape} | {layout_bandwidth(shape, False):.1f} "
              f"| {layout_bandwidth(shape, True):.1f} |")
    print()
    recompute = results["use_cache=False (recompute, nanoGPT)"]
    best_floor = max(results["floor: weight streaming, nn.Linear layout"],
                     results["floor: weight streaming, decoding layout"])
    for name in ("use_cache=True", "use_cache=True, optimize_for_decoding"):
        print(f"# {name}: {results[name] / recompute:.1f}x recompute, "
              f"{results[name] / best_floor:.0%} of the best fp32 floor ({best_floor:.1f} tokens/s)")
    print(f"# bf16: {results['use_cache=True, bf16 weights'] / results['floor: weight streaming, bf16']:.0%}"
          " of its floor")


if __name__ == "__main__":
    main()
