"""Decoding speed of a GPT-2 124M-shaped model (random weights, batch 1) against the weight-streaming floor.

    python benchmarks/generate.py [--threads=2] [--new_tokens=256] [--prompt_len=16] [--rounds=3]

A batch-1 decode step must read every weight once, so one pass of matrix-vector products over the same
matrices (in the model's layout and dtype, int8 through the same kernel) bounds tokens/s from above: the floor
rows. Every configuration is timed in this one run, `--rounds` times in turn, each row its best round, so
ratios hold even on a noisy machine. With onnxruntime installed (`gptforge[onnx]`), the same model, exported
as `gptforge export --format=onnx` writes it, is timed on onnxruntime's CPU provider too; with
llama-cpp-python (`make install`) and the GPT-2 BPE files (a mirror), the same model exported as
`gptforge export --format=gguf` writes it, f32 and q8_0, in llama.cpp with as many threads.
"""

import argparse
import copy
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
from gptforge.generate import decoding_model, optimize_for_decoding
from gptforge.kv_cache import KVCache
from gptforge.quantize import Int8Linear

CONTEXTS = (16, 256, 512, 1000)
ONNX = "onnxruntime CPU EP (export --format=onnx)"
LLAMA_CPP = {"f32": "llama.cpp f32 (export --format=gguf)", "q8_0": "llama.cpp q8_0 (--gguf_type=q8_0)"}


def best_time(fn: Callable[[], object], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def floor_seconds(model: GPT) -> float:
    """One matrix-vector product with every matmul weight of the model: the least a decode step reads.
    Int8 weights go through their layer's kernel with its bf16 input, as the model calls it."""
    layers = [m for m in model.modules() if isinstance(m, nn.Linear | Int8Linear)]
    dtype = next(model.parameters()).dtype
    vectors = {n: torch.randn(1, n, dtype=dtype) for n in {m.in_features for m in layers}}
    kernel = torch.ops.aten._weight_int8pack_mm
    int8_inputs = {n: v.bfloat16() for n, v in vectors.items()}

    def one_pass() -> None:
        for m in layers:
            if isinstance(m, Int8Linear):
                kernel(int8_inputs[m.in_features], m.weight, m.scales)
            else:
                F.linear(vectors[m.in_features], m.weight)

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


class LlamaCppDecoder:
    """The GGUF export of a model in llama.cpp (through llama-cpp-python): greedy decoding, a token per
    `eval`, the argmax read from llama.cpp's logits in place. An f32 KV cache, as gptforge's."""

    def __init__(self, model: GPT, path: Path, gguf_type: str, threads: int):
        import llama_cpp

        from gptforge.gguf_export import write_gguf
        from gptforge.runs import Run
        from gptforge.tokenizer import GPT2Tokenizer

        write_gguf(Run(model, GPT2Tokenizer(), {}), path, gguf_type)  # type: ignore[arg-type]
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=model.config.block_size, n_threads=threads,
                                   n_threads_batch=threads, type_k=0, type_v=0, verbose=False)  # 0: f32
        self.n_vocab = self.llm.n_vocab()

    def next_token(self) -> int:
        return int(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.n_vocab,)).argmax())

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> list[int]:
        self.llm.reset()
        self.llm.eval(prompt[0].tolist())
        out = []
        for _ in range(new_tokens):
            out.append(self.next_token())
            self.llm.eval(out[-1:])
        return out

    def rate(self, prompt: torch.Tensor, new_tokens: int) -> float:
        """Tokens/s of a whole greedy decode, prompt processing included, as `generate_rate`."""
        t0 = time.perf_counter()
        self.generate(prompt, new_tokens)
        return new_tokens / (time.perf_counter() - t0)

    def step_ms(self, context: int, steps: int) -> float:
        """Milliseconds per new token after `context - 1` cached positions, as `step_ms`."""
        self.llm.reset()
        self.llm.eval([0] * (context - 1))

        def step() -> None:
            self.llm.eval([0])
            self.llm.n_tokens -= 1  # the next eval drops this position from the cache and writes it again

        step()  # warm-up
        return best_time(step, repeats=steps) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new_tokens", type=int, default=256)
    parser.add_argument("--prompt_len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="decode steps timed per context length")
    parser.add_argument("--rounds", type=int, default=3, help="times each row is timed, in turn; its best")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    prompt = torch.randint(0, 50304, (1, args.prompt_len))

    base = GPT(GPTConfig()).eval()  # GPT-2 124M shape, vocab 50304, fp32; every row decodes these weights
    fast = optimize_for_decoding(copy.deepcopy(base))
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    int8 = decoding_model(copy.deepcopy(base), "cpu", "float32", "int8")
    rows = [
        ("use_cache=False (recompute, nanoGPT)", base, False),
        ("use_cache=True", base, True),
        ("use_cache=True, optimize_for_decoding", fast, True),
        ("use_cache=True, bf16 weights", bf16, True),
        ("use_cache=True, --quantize=int8", int8, True),
    ]
    floors = [("floor: weight streaming, nn.Linear layout", base),
              ("floor: weight streaming, decoding layout", fast),
              ("floor: weight streaming, bf16", bf16),
              ("floor: weight streaming, int8", int8)]
    with tempfile.TemporaryDirectory() as directory:
        others = other_decoders(base, Path(directory), args.threads)
        best: dict[str, float] = {}
        for round in range(args.rounds):
            for name, model, use_cache in rows:
                if use_cache or round == 0:  # recomputation is slow and far off: one round
                    model.generate(prompt, 4, temperature=0, use_cache=use_cache)  # warm-up
                    rate = generate_rate(model, prompt, args.new_tokens, use_cache)
                    best[name] = max(best.get(name, 0.0), rate)
            for name, decoder in others.items():
                decoder.generate(prompt, 4)  # warm-up
                best[name] = max(best.get(name, 0.0), decoder.rate(prompt, args.new_tokens))
            for name, model in floors:
                best[name] = max(best.get(name, 0.0), 1 / floor_seconds(model))
        print(f"# {platform.processor() or platform.machine()}, {args.threads} threads, "
              f"torch {torch.__version__}, best of {args.rounds} rounds")
        print(f"# {args.prompt_len}-token prompt, {args.new_tokens} new tokens, batch 1, greedy")
        header = (f"| {'configuration':<42} | {'tokens/s':>8} | "
                  + " | ".join(f"ms/tok @{c:>4}" for c in CONTEXTS) + " |")
        print(header)
        print("|" + "|".join("-" * (len(col) + 0) for col in header.split("|")[1:-1]) + "|")
        step16 = {}
        for name, model, use_cache in rows:
            ms = [step_ms(model, c, use_cache, args.steps if use_cache else 2) for c in CONTEXTS]
            step16[name] = ms[0]
            print(f"| {name:<42} | {best[name]:>8.1f} | " + " | ".join(f"{m:>11.1f}" for m in ms) + " |")
        for name, decoder in others.items():
            ms = [decoder.step_ms(c, args.steps) for c in CONTEXTS]
            step16[name] = ms[0]
            print(f"| {name:<42} | {best[name]:>8.1f} | " + " | ".join(f"{m:>11.1f}" for m in ms) + " |")
            if isinstance(decoder, LlamaCppDecoder):
                decoder.llm.close()  # now, not at interpreter exit, where llama-cpp-python's cleanup fails
    for name, _ in floors:
        ms = 1000 / best[name]
        print(f"| {name:<42} | {best[name]:>8.1f} | " + " | ".join(f"{ms:>11.1f}" for _ in CONTEXTS) + " |")

    print("\n| matrix (out, in) | nn.Linear layout GB/s | transposed layout GB/s |")
    print("|---|---|---|")
    for name, shape in (("c_attn", (2304, 768)), ("attn.c_proj", (768, 768)), ("c_fc", (3072, 768)),
                        ("mlp.c_proj", (768, 3072)), ("lm_head", (50304, 768))):
        print(f"| {name} {shape} | {layout_bandwidth(shape, False):.1f} "
              f"| {layout_bandwidth(shape, True):.1f} |")
    print()
    summarize(best, step16)


Decoder = OnnxRuntimeDecoder | LlamaCppDecoder


def other_decoders(model: GPT, directory: Path, threads: int) -> dict[str, Decoder]:
    """The same model in onnxruntime and llama.cpp, those of them that are installed, by row name."""
    decoders: dict[str, Decoder] = {}
    if all(importlib.util.find_spec(p) for p in ("onnxruntime", "onnx", "onnxscript")):
        decoders[ONNX] = OnnxRuntimeDecoder(model, directory / "onnx", threads)
    else:
        print("# onnxruntime not installed (pip install 'gptforge[onnx]'): its row is left out")
    if importlib.util.find_spec("llama_cpp"):
        for gguf_type, name in LLAMA_CPP.items():
            decoders[name] = LlamaCppDecoder(model, directory / f"model-{gguf_type}.gguf", gguf_type, threads)
    else:
        print("# llama-cpp-python not installed (make install builds it): its rows are left out")
    return decoders


def summarize(best: dict[str, float], step16: dict[str, float]) -> None:
    """The ratios the table is for: the KV cache over recomputation, each decode against its own floor
    (whole-generate tokens/s, and one step at 16 tokens of context), int8 over fp32, and against llama.cpp."""
    recompute = best["use_cache=False (recompute, nanoGPT)"]
    best_floor = max(best["floor: weight streaming, nn.Linear layout"],
                     best["floor: weight streaming, decoding layout"])
    for name, floor in (("use_cache=True", best_floor), ("use_cache=True, optimize_for_decoding", best_floor),
                        ("use_cache=True, bf16 weights", best["floor: weight streaming, bf16"]),
                        ("use_cache=True, --quantize=int8", best["floor: weight streaming, int8"])):
        print(f"# {name}: {best[name] / recompute:.1f}x recompute, {best[name] / floor:.0%} of its floor "
              f"({floor:.1f} tokens/s); one step @16: {1000 / step16[name] / floor:.0%}")
    fp32, int8 = best["use_cache=True, optimize_for_decoding"], best["use_cache=True, --quantize=int8"]
    print(f"# --quantize=int8: {int8 / fp32:.2f}x fp32 (optimize_for_decoding)")
    if ONNX in best:
        print(f"# {ONNX}: {best[ONNX] / best['use_cache=True']:.2f}x use_cache=True, "
              f"{best[ONNX] / fp32:.2f}x optimize_for_decoding, "
              f"{best[ONNX] / best_floor:.0%} of the fp32 floor")
    for gguf_type, ours in (("f32", "use_cache=True, optimize_for_decoding"),
                            ("q8_0", "use_cache=True, --quantize=int8")):
        name = LLAMA_CPP[gguf_type]
        if name in best:
            print(f"# gptforge {ours} / {name}: {best[ours] / best[name]:.2f}x its tokens/s, "
                  f"{step16[name] / step16[ours]:.2f}x its speed in one step @16")


if __name__ == "__main__":
    main()
