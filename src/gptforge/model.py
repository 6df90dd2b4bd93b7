"""The GPT-2 network: numerically the GPT-2 of OpenAI and Hugging Face, in one file.

References:
1) OpenAI's official GPT-2 TensorFlow implementation:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face transformers' PyTorch implementation:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py

This module knows tensors of token ids and nothing of text. Decoding loops live in `generate.py`, Hugging Face
conversion in `hf.py`, checkpoint files in `checkpoint.py`; the methods here that reach them are thin doors.
"""

import inspect
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn as nn
from torch.nn import functional as F

if TYPE_CHECKING:
    from collections.abc import Iterator


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50304  # GPT-2's 50257 padded up to a multiple of 64 for efficiency
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linears and LayerNorms, like GPT-2; False is a bit better and faster
    # GPT-2 (OpenAI and HF's `gelu_new`) uses the tanh approximation; nanoGPT trained with the exact
    # erf GELU, so its checkpoints load with "none".
    gelu_approximate: Literal["tanh", "none"] = "tanh"

    def __post_init__(self) -> None:
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}): "
                "each head gets n_embd // n_head channels"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"GPTConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if self.gelu_approximate not in ("tanh", "none"):
            raise ValueError(f"GPTConfig.gelu_approximate must be 'tanh' or 'none', got {self.gelu_approximate!r}")

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "GPTConfig":
        """Build a config from a dict that may carry keys of other versions; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in args.items() if k in names})


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Decoding one token then costs one token's compute: attention reads the cached keys and values of all
    earlier positions instead of recomputing them. `pos` counts the positions already cached.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None):
        self.n_layer, self.batch_size = config.n_layer, batch_size
        self.max_len = max_len or config.block_size
        self.head_shape = (config.n_head, config.n_embd // config.n_head)
        self.k: torch.Tensor | None = None  # allocated on first use with the dtype/device of the keys
        self.v: torch.Tensor | None = None
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (B, nh, T, hs) of `layer`; return all cached ones up to this step."""
        if self.k is None or self.v is None:
            n_head, head_size = self.head_shape
            shape = (self.n_layer, self.batch_size, n_head, self.max_len, head_size)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        # key, query, value projections for all heads, in one batched matmul
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout
        self.layer = layer  # index into the KV cache

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer, k, v)
        # Causal attention. The queries sit at positions past..past+T-1 and see every key up to their own
        # position: a plain causal mask when nothing is cached, none for a single new token, and an offset
        # mask for a chunk after a cached prefix (is_causal would align the mask to the top-left).
        mask = None
        if past and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=past == 0 and T > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, kv_cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and un-embeds.
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections' init by 1/sqrt(2 * n_layer), two per block.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters. The token embedding counts (it is the tied head); position embeddings
        count only with non_embedding=False."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n_params -= self.transformer.wpe.weight.numel()
        return n_params

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: KVCache | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and loss. With targets: logits of every position and the mean cross-entropy (targets of
        -1 are ignored). Without: logits of the last position only, shape (B, 1, vocab_size).

        With a `kv_cache`, `idx` holds the tokens that follow the `kv_cache.pos` cached ones.
        """
        T = idx.size(1)
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {past + T}: the model's block_size is "
                f"{self.config.block_size}; crop the input to its last {self.config.block_size} tokens"
            )
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.pos += T

        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        # inference-time mini-optimization: only forward the lm_head on the very last position
        logits = self.lm_head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
        return logits, None

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length, e.g. to finetune GPT-2 (1024) on shorter blocks."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in 1..{self.config.block_size}, got {block_size}")
        self.config.block_size = block_size
        self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def configure_optimizers(
        self, weight_decay: float, learning_rate: float, betas: tuple[float, float], device_type: str
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on the >= 2-D weights (matmuls, embeddings) only, not biases and norms."""
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        # The fused kernel is one launch per step instead of a loop over tensors; CPU has it since 2.4.
        fused = "fused" in inspect.signature(torch.optim.AdamW).parameters and device_type in ("cuda", "cpu")
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=fused)

    def estimate_mfu(
        self, fwdbwd_per_iter: int, dt: float, dtype: torch.dtype | None = None, peak_flops: float | None = None
    ) -> float | None:
        """Model FLOPs utilization: achieved FLOPS over the device's peak (PaLM paper, Appendix B).

        The peak is looked up for the device the model is on and the compute `dtype` (default: the
        parameters'), or given as `peak_flops`. None when the peak of this device is unknown.
        """
        from gptforge.flops import peak_flops_per_sec

        cfg = self.config
        N = self.get_num_params()
        L, H, Q, T = cfg.n_layer, cfg.n_head, cfg.n_embd // cfg.n_head, cfg.block_size
        flops_per_token = 6 * N + 12 * L * H * Q * T
        flops_achieved = flops_per_token * T * fwdbwd_per_iter / dt
        param = next(self.parameters())
        peak = peak_flops or peak_flops_per_sec(param.device, dtype or param.dtype)
        return flops_achieved / peak if peak else None

    # -- generation, pretrained weights and checkpoints: thin doors to their own modules --

    def generate(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
        """Append `max_new_tokens` sampled tokens to each prompt in `idx` (B, T); see `generate.generate`."""
        from gptforge.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)

    def generate_stream(self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any) -> "Iterator[torch.Tensor]":
        """Yield each step's new tokens (B,) as they are produced; see `generate.stream`."""
        from gptforge.generate import stream

        return stream(self, idx, max_new_tokens, **kwargs)

    @classmethod
    def from_pretrained(cls, name_or_dir: str | Path, override_args: dict[str, Any] | None = None) -> "GPT":
        """GPT-2 weights from the Hugging Face hub (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a local
        HF GPT-2 directory; see `hf.load_hf_gpt2`."""
        from gptforge.hf import load_hf_gpt2

        return load_hf_gpt2(name_or_dir, override_args)

    def to_hf(self, directory: str | Path) -> None:
        """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads; see `hf.save_hf_gpt2`."""
        from gptforge.hf import save_hf_gpt2

        save_hf_gpt2(self, directory)

    @classmethod
    def from_checkpoint(cls, path: str | Path, override_args: dict[str, Any] | None = None) -> "GPT":
        """A gptforge or nanoGPT checkpoint, loaded without unpickling code; see `checkpoint.load_model`."""
        from gptforge.checkpoint import load_model

        return load_model(path, override_args)
