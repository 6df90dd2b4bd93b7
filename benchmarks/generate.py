"""Decoding speed of a GPT-2 124M-shaped model (random weights, batch 1) against the weight-streaming floor.

    python benchmarks/generate.py [--threads=2] [--new_tokens=256] [--prompt_len=16]

A batch-1 decode step must read every weight once, so one pass of matrix-vector products over the same
matrices (in the model's layout) bounds tokens/s from above: the floor rows. Every configuration is timed
in this one run, so ratios hold even on a noisy machine. With onnxruntime installed (`gptforge[onnx]`), the
same model, exported as `gptforge export --format=onnx` writes it, is timed on onnxruntime's CPU provider too.
"""

import argparse
import importlib.util
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from gptforge import GPT, GPTConfig
from gptforge.generate import optimize_for_decoding
from gptforge.kv_cache import KVCache

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


class OnnxRuntimeDecoder:
    """The ONNX export of a model in an onnxruntime session (CPU provider): greedy decoding, each step fed
    the present keys and values of the one before."""

    def __init__(self, model: GPT, directory: Path, threads: int):
        import onnxruntime

        from gptforge.onnx_export import input_names, output_names, save_onnx

        save_onnx(model, directory)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(str(directory / "model.onnx"), options,
                                                    providers=["CPUExecutionProvider"])
        self.past_names, self.outputs = input_names(model.config)[1:], output_names(model.config)
        self.past_shape = (model.config.n_head, model.config.n_embd // model.config.n_head)

    def past(self, length: int) -> list[np.ndarray]:
        n_head, head_size = self.past_shape
        return [np.zeros((1, n_head, length, head_size), np.float32) for _ in self.past_names]

    def step(self, ids: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        feed = {"input_ids": ids, **dict(zip(self.past_names, past, strict=True))}
        logits, *present = self.session.run(self.outputs, feed)
        return logits, present

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> np.ndarray:
        ids, past, out = prompt.numpy(), self.past(0), []
        for _ in range(new_tokens):
            logits, past = self.step(ids, past)
            ids = logits[:, -1:].argmax(-1)
            out.append(ids)
        return np.concatenate(out, axis=1)

    def rate(self, prompt: torch.Tensor, new_tokens: int) -> float:
        """Tokens/s of a whole greedy decode, prompt processing included, as `generate_rate`."""
        t0 = time.perf_counter()
        self.generate(prompt, new_tokens)
        return new_tokens / (time.perf_counter() - t0)

    def step_ms(self, context: int, steps: int) -> float:
        """Milliseconds per new token after `context - 1` cached positions, as `step_ms`."""
        past, token = self.past(context - 1), np.zeros((1, 1), np.int64)
        self.step(token, past)  # warm-up
        return best_time(lambda: self.step(token, past), repeats=steps) * 1000


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
    onnx = "onnxruntime CPU EP (export --format=onnx)"
    if all(importlib.util.find_spec(p) for p in ("onnxruntime", "onnx", "onnxscript")):
        with tempfile.TemporaryDirectory() as directory:
            ort = OnnxRuntimeDecoder(base, Path(directory), args.threads)  # the same weights as `base`
            ort.generate(prompt, 4)  # warm-up
            results[onnx] = ort.rate(prompt, args.new_tokens)
            ms = [ort.step_ms(c, args.steps) for c in CONTEXTS]
        print(f"| {onnx:<42} | {results[onnx]:>8.1f} | " + " | ".join(f"{m:>11.1f}" for m in ms) + " |")
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
    if onnx in results:
        fast_rate = results["use_cache=True, optimize_for_decoding"]
        print(f"# {onnx}: {results[onnx] / results['use_cache=True']:.2f}x use_cache=True, "
              f"{results[onnx] / fast_rate:.2f}x optimize_for_decoding, "
              f"{results[onnx] / best_floor:.0%} of the best fp32 floor")
    else:
        print("# onnxruntime not installed (pip install 'gptforge[onnx]'): its row is left out")


if __name__ == "__main__":
    main()
