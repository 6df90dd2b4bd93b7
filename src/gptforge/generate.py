"""Autoregressive decoding: sampling filters and the token-by-token loop, with or without a KV cache.

Knows token ids and logits only, never text. The model is anything with `config.block_size`,
`config.n_layer`... and `forward(idx, kv_cache=...) -> (logits, _)`, i.e. `gptforge.model.GPT`.

Context semantics: each new token is sampled from the model conditioned on the last `block_size` tokens
of the sequence so far (prompt included), with positions counted from the start of that window, exactly as
nanoGPT's `idx[:, -block_size:]` crop. While the sequence fits in `block_size`, the KV cache reuses earlier
keys and values (one token of compute per step). Once it no longer fits, the window slides by one token per
step, every position embedding changes, and the cache cannot be reused: each step then recomputes the
window from scratch, which is what `use_cache=False` does at every step.
"""

from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptforge.device import torch_dtype
from gptforge.kv_cache import KVCache
from gptforge.model import GPT
from gptforge.quantize import quantize as quantized


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Set to -inf the logits outside the `top_k` largest and outside the nucleus of mass `top_p`.

    Both filters compose: top-k first, then top-p over what remains. The most likely token always stays.
    """
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be a positive integer or None, got {top_k}")
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[..., [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        if top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            probs = sorted_logits.softmax(dim=-1)
            # drop a token when the tokens ranked above it already hold at least top_p of the mass
            drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
            drop_sorted[..., 0] = False  # a top_p below float32's range (1e-300) must still leave one token
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits (B, V): greedy at temperature 0, else sampled from the filtered
    softmax."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = next_token_probs(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def next_token_probs(
    logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None
) -> torch.Tensor:
    """The distribution (..., V), in float32, that `sample_next` draws from at a temperature > 0."""
    scaled = logits.float() / temperature
    probs = F.softmax(filter_logits(scaled, top_k, top_p), dim=-1)
    overflow = ~overflow_free(scaled)
    if overflow.any():  # the point mass on the argmax, which is what such a temperature's softmax means
        probs[overflow] = F.one_hot(logits[overflow].argmax(dim=-1), logits.size(-1)).float()
    return probs


def overflow_free(scaled: torch.Tensor) -> torch.Tensor:
    """Per row of logits divided by a temperature: whether the division stayed finite. A tiny temperature
    (1e-40) overflows the largest logits to inf, and their softmax to NaN; such a row samples greedily."""
    return torch.isfinite(scaled.max(dim=-1).values)


@torch.inference_mode()
def stream(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
    stop_tokens: Iterable[int] | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), for up to `max_new_tokens` steps.

    A row that has produced one of `stop_tokens` is finished: from then on it yields that same stop token
    again (its padding), and the stream ends early once every row is finished. The model's train/eval mode
    is left as it is: call `model.eval()` first so that dropout is off.
    """
    if idx.dim() != 2 or idx.size(1) == 0:
        raise ValueError("idx must be a (batch, time) tensor with at least one token, got shape "
                         f"{tuple(idx.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    B, T = idx.shape
    block_size = model.config.block_size
    seq = torch.empty(B, T + max_new_tokens, dtype=torch.long, device=idx.device)
    seq[:, :T] = idx
    cache = KVCache(model.config, B) if use_cache else None
    stops = torch.tensor(sorted(set(stop_tokens or ())), dtype=torch.long, device=idx.device)
    done = torch.zeros(B, dtype=torch.bool, device=idx.device)
    pad = torch.zeros(B, dtype=torch.long, device=idx.device)

    for length in range(T, T + max_new_tokens):
        start = max(0, length - block_size)
        if cache is not None and (start > 0 or cache.pos == 0):
            cache.reset()  # first step, or the window slid: positions changed, recompute it into the cache
        begin = start if cache is None else start + cache.pos
        logits, _ = model(seq[:, begin:length], kv_cache=cache)
        token = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        if stops.numel():
            token = torch.where(done, pad, token)
            newly_done = ~done & torch.isin(token, stops)
            pad = torch.where(newly_done, token, pad)
            done |= newly_done
        seq[:, length] = token
        yield token
        if stops.numel() and bool(done.all()):
            return


def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, **kwargs) -> torch.Tensor:
    """The prompts `idx` (B, T) with `max_new_tokens` new tokens appended: (B, T + max_new_tokens).

    Takes the keyword arguments of `stream`. Rows that stopped early are padded with their stop token.
    """
    steps = list(stream(model, idx, max_new_tokens, **kwargs))
    if len(steps) < max_new_tokens:  # every row stopped: the last step holds each row's stop token
        steps += [steps[-1]] * (max_new_tokens - len(steps))
    return torch.cat([idx, *(s.unsqueeze(1) for s in steps)], dim=1) if steps else idx.clone()


def optimize_for_decoding(model: GPT) -> GPT:
    """Re-lay fp32 CPU matmul weights for fast decoding; values, shapes and results stay the same.

    A decode step multiplies one vector by every weight matrix, so it is bound by how fast the weights stream
    from memory. PyTorch's fp32 CPU matrix-vector kernel streams a matrix stored (in, out) in memory, the
    transpose of `nn.Linear`'s (out, in), up to 2x faster when out >= in (docs/benchmarks.md). Only the
    strides change: `state_dict`, checkpoints and exports are unaffected. For inference: training keeps the
    standard layout. Call it after any `.to(dtype)`; other dtypes and devices are left as they are (fp16's
    kernel, for one, is much slower in this layout).
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            w = module.weight
            if w.device.type == "cpu" and w.dtype == torch.float32 and w.size(0) >= w.size(1):
                w.data = w.data.t().contiguous().t()
    return model


def decoding_model(model: GPT, device: str, dtype: str, quantize: str = "none") -> GPT:
    """`model` ready to decode on `device`: in eval mode, its weights themselves in `dtype` and laid out for
    decoding, or `quantize`d (quantize.py). Decoding streams every weight once per token, so the weights take
    the dtype (half the bytes in 16 bits, a quarter in int8) rather than an autocast over fp32 weights."""
    model = quantized(model.to(device=device, dtype=torch_dtype(dtype)).eval(), quantize)
    return optimize_for_decoding(model)
