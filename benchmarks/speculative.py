"""Speculative decoding against plain decoding: acceptance, tokens per round, speed-up, and the break-even.

    python benchmarks/speculative.py --target=RUN --draft=RUN [--ks=1,2,4,8] [--temperatures=0,0.8]
        [--prompts=6] [--new_tokens=N] [--rounds=3] [--threads=2]

Both models decode batch 1 in float32 on the CPU, as `gptforge sample` places them. Plain decoding and every
K are timed in this one run, `--rounds` times in turn (each row its best round), over the same prompts
(openings of speeches, up to the target's block_size); the ratios hold on a noisy machine. Greedy rows
also check that the tokens are plain decoding's.

The break-even: a round costs K draft steps and one target forward of K + 1 tokens, K * c + v in units of a
target step (c: the draft's step over the target's, v: the target's forward of K + 1 tokens over one token's,
both measured here), and yields (1 - a^(K+1)) / (1 - a) tokens when each draft token is accepted with
probability a (Leviathan et al., 2023). Speculation wins when a passes the a* where the two are equal; the
measured a is the one that gives the measured tokens per round.
"""

import argparse
import functools
import platform
import time
from collections.abc import Callable

import torch

from gptforge.generate import decoding_model, stream
from gptforge.kv_cache import KVCache
from gptforge.model import GPT
from gptforge.source import load_source
from gptforge.speculative import Speculator
from gptforge.speculative import stream as speculative_stream

# Shakespeare's openings of speeches, as the tinyshakespeare text has them
PROMPTS = ["ROMEO:\n", "JULIET:\nO ", "First Citizen:\n", "KING RICHARD III:\n", "MENENIUS:\nWhat ", "\n"]


def tokens_per_round(a: float, k: int) -> float:
    return k + 1.0 if a >= 1 else (1 - a ** (k + 1)) / (1 - a)


def solve(target: float, k: int) -> float:
    """The acceptance probability a in [0, 1] that yields `target` tokens per round (bisection)."""
    if target <= 1:
        return 0.0
    if target >= k + 1:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if tokens_per_round(mid, k) < target else (lo, mid)
    return (lo + hi) / 2


def step_seconds(model: GPT, tokens: int, context: int, repeats: int = 200) -> float:
    """The best time of one cached forward of `tokens` tokens after `context` cached positions."""
    cache = KVCache(model.config, 1)
    prefix = torch.randint(0, model.config.vocab_size, (1, context))
    chunk = torch.randint(0, model.config.vocab_size, (1, tokens))
    best = float("inf")
    with torch.inference_mode():
        model(prefix, kv_cache=cache)
        for _ in range(repeats):
            cache.pos = context
            t0 = time.perf_counter()
            model(chunk, kv_cache=cache)
            best = min(best, time.perf_counter() - t0)
    return best


def decode(target: GPT, speculator: Speculator | None, prompts: list[torch.Tensor], new_tokens: int,
           temperature: float) -> list[list[int]]:
    """Every prompt's new tokens, plainly or speculatively, the draws seeded the same."""
    gen = torch.Generator().manual_seed(0)
    out = []
    for prompt in prompts:
        if speculator is None:
            tokens = stream(target, prompt, new_tokens, temperature=temperature, top_k=None, generator=gen)
        else:
            tokens = speculative_stream(speculator, prompt, new_tokens, temperature=temperature,
                                        generator=gen)
        out.append([int(t) for t in tokens])
    return out


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="the model's run directory, or what init_from takes")
    parser.add_argument("--draft", required=True, help="the draft's run directory")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--temperatures", default="0,0.8")
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--new_tokens", type=int, default=None, help="default: up to the block_size")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    source, draft_source = load_source(args.target), load_source(args.draft)
    target = decoding_model(source.model, "cpu", "float32")
    draft = decoding_model(draft_source.model, "cpu", "float32")
    block_size = target.config.block_size
    prompts = [torch.tensor([source.tokenizer.encode(text)]) for text in PROMPTS[: args.prompts]]
    new_tokens = args.new_tokens or block_size - max(p.size(1) for p in prompts)
    ks = [int(k) for k in args.ks.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]

    context = block_size // 2  # the costs at the middle of the window
    target_step = step_seconds(target, 1, context)
    c = step_seconds(draft, 1, context) / target_step
    verify = {k: step_seconds(target, k + 1, context) / target_step for k in ks}
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"target {args.target}: {target.get_num_params():,} parameters, {target.config.n_layer} layers; "
          f"draft {args.draft}: {draft.get_num_params():,}, {draft.config.n_layer} layers")
    print(f"one target step {target_step * 1e3:.2f} ms; draft step / target step c = {c:.2f}; "
          + ", ".join(f"forward of {k + 1} tokens / one v = {v:.2f}" for k, v in verify.items()))
    print(f"(at {context} cached positions); {len(prompts)} prompts, {new_tokens} new tokens each, "
          f"best of {args.rounds} rounds\n")

    for temperature in temperatures:
        speculators = {k: Speculator(target, draft, k) for k in ks}
        runs = {"plain": functools.partial(decode, target, None, prompts, new_tokens, temperature),
                **{k: functools.partial(decode, target, speculators[k], prompts, new_tokens, temperature)
                   for k in ks}}
        best = {"plain": float("inf"), **{k: float("inf") for k in ks}}
        outputs: dict[object, list[list[int]]] = {}
        for _ in range(args.rounds):  # interleaved: every configuration sees the same load
            for key, fn in runs.items():
                seconds, outputs[key] = timed(fn)
                best[key] = min(best[key], seconds)
        tokens = len(prompts) * new_tokens
        print(f"temperature {temperature}:")
        print("| decoding | tokens/s | speed-up | draft tokens accepted | tokens per round | a (measured) "
              "| a* (break-even) | greedy = plain |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        print(f"| plain | {tokens / best['plain']:.0f} | 1.00 | | 1 | | | |")
        for k in ks:
            stats = speculators[k].acceptance
            per_round = stats.tokens / stats.rounds
            a = solve(per_round, k)
            cost = k * c + verify[k]
            breakeven = solve(cost, k) if cost < k + 1 else float("nan")
            same = "yes" if outputs[k] == outputs["plain"] else "no"
            print(f"| K={k} | {tokens / best[k]:.0f} | {best['plain'] / best[k]:.2f} | {stats.rate:.0%} "
                  f"| {per_round:.2f} | {a:.2f} | {breakeven:.2f} | {same if temperature == 0 else '-'} |")
        print()


if __name__ == "__main__":
    main()
