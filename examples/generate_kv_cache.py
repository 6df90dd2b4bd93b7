"""Generation demo: build a GPT-2 124M-shaped model and generate from it, with and without the KV cache.

    .venv/bin/python examples/generate_kv_cache.py

The weights are random, so the tokens are noise; what this shows is the API, the speed of cached decoding
and that it gives exactly the tokens of full recomputation.
"""

import time

import torch

from gptforge import GPT, GPTConfig
from gptforge.generate import optimize_for_decoding


def main() -> None:
    torch.manual_seed(0)
    model = GPT(GPTConfig()).eval()  # GPT-2 124M: 12 layers, 12 heads, 768 wide
    print(f"GPT-2 124M-shaped model: {model.get_num_params() / 1e6:.1f}M parameters")
    prompt = torch.randint(0, model.config.vocab_size, (1, 16))
    new_tokens = 32

    runs = {}
    for name, use_cache in (("recompute (use_cache=False)", False), ("KV cache (use_cache=True)", True)):
        t0 = time.perf_counter()
        runs[name] = model.generate(prompt, new_tokens, temperature=0, use_cache=use_cache)
        print(f"{name:<30} {new_tokens / (time.perf_counter() - t0):6.1f} tokens/s")
    optimize_for_decoding(model)
    t0 = time.perf_counter()
    fast = model.generate(prompt, new_tokens, temperature=0)
    print(f"{'KV cache + decoding layout':<30} {new_tokens / (time.perf_counter() - t0):6.1f} tokens/s")

    cached, recomputed = runs.values()
    print("same tokens:", torch.equal(cached, recomputed) and torch.equal(cached, fast))
    print("first new tokens:", cached[0, 16:28].tolist())


if __name__ == "__main__":
    main()
