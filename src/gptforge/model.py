"""The GPT-2 network: numerically the GPT-2 of OpenAI and Hugging Face, in one file.

With its options left at their defaults it is exactly GPT-2. The options (rotary positions, RMSNorm, ReLU² or
SwiGLU, QK-norm, an untied head, logit soft-capping, zero-initialised projections) are the architecture
changes of the modded-nanogpt speedrun and of Llama, each a small module or a line where it acts.

References:
1) OpenAI's official GPT-2 TensorFlow implementation:
   https://github.com/openai/gpt-2/blob/master/src/model.py
2) Hugging Face transformers' PyTorch implementation:
   https://github.com/huggingface/transformers/blob/main/src/transformers/models/gpt2/modeling_gpt2.py
3) modded-nanogpt, the NanoGPT speedrun: https://github.com/KellerJordan/modded-nanogpt

This module knows tensors of token ids and nothing of text. KV caches live in `kv_cache.py` (attention asks
the cache it is given), decoding loops in `generate.py`, Hugging Face conversion in `hf.py`, checkpoint files
in `checkpoint.py`; the methods here that reach them are thin doors, and this module imports none of them.
"""

import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import torch
import torch.nn as nn
import torch.utils.checkpoint
from torch.nn import functional as F

if TYPE_CHECKING:
    from collections.abc import Iterator

    from gptforge.kv_cache import Cache

NORM_EPS = 1e-5  # LayerNorm's (GPT-2's) epsilon, used by RMSNorm and QK-norm too, whatever the dtype
ROPE_BASE = 10000.0  # the rotary frequencies' base, as in RoFormer and Llama
# The values of GPTConfig's string options, the first GPT-2's; TrainConfig declares its model keys with these.
GeluApproximate = Literal["tanh", "none"]
PosEmb = Literal["learned", "rope"]
Norm = Literal["layernorm", "rmsnorm"]
Mlp = Literal["gelu", "relu2", "swiglu"]


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
    gelu_approximate: GeluApproximate = "tanh"
    # Beyond GPT-2 (docs/model.md): every default below is GPT-2's, so a config without them is GPT-2.
    pos_emb: PosEmb = "learned"  # learned absolute embeddings (wpe), or rotary
    norm: Norm = "layernorm"
    mlp: Mlp = "gelu"  # the feed-forward's activation (swiglu: gated)
    qk_norm: bool = False  # RMS-normalise each head's queries and keys before attention
    tie_embeddings: bool = True  # the output head is the token embedding; False gives it its own matrix
    logit_softcap: float | None = None  # logits become cap * tanh(logits / cap)
    zero_init_proj: bool = False  # the residual projections start at zero: every block starts as identity

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
        for name, allowed in choices().items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GPTConfig.{name} must be one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")
        for f in fields(self):
            if f.type is bool and not isinstance(getattr(self, f.name), bool):
                raise ValueError(f"GPTConfig.{f.name} must be True or False, got {getattr(self, f.name)!r}")
        cap = self.logit_softcap
        if cap is not None and (
            isinstance(cap, bool) or not isinstance(cap, int | float) or not 0 < cap < math.inf
        ):
            raise ValueError(f"GPTConfig.logit_softcap must be a positive number or None, got {cap!r}")
        if self.pos_emb == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(
                f"GPTConfig.pos_emb='rope' rotates pairs of channels: the head size n_embd // n_head "
                f"({self.n_embd // self.n_head}) must be even"
            )

    @classmethod
    def from_dict(cls, args: dict[str, Any]) -> "GPTConfig":
        """Build a config from a dict that may carry keys of other versions; unknown keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in args.items() if k in names})

    def off_gpt2(self, names: Iterable[str]) -> list[str]:
        """`name=value` for each of `names` set off GPT-2's value (its default): what a format that holds only
        GPT-2's architecture must refuse."""
        gpt2 = GPTConfig()
        return [f"{name}={getattr(self, name)!r}" for name in names
                if getattr(self, name) != getattr(gpt2, name)]


def choices() -> dict[str, tuple[str, ...]]:
    """The allowed values of each of GPTConfig's string options, read from their Literal types."""
    return {f.name: get_args(f.type) for f in fields(GPTConfig) if get_origin(f.type) is Literal}


# The fields that fix a model's shape and function, which a run keeps for its life: all but the vocabulary
# (the dataset's) and dropout (a training choice, changed freely on resume or finetuning).
MODEL_KEYS = tuple(f.name for f in fields(GPTConfig) if f.name not in ("vocab_size", "dropout"))


def norm(config: GPTConfig) -> nn.Module:
    """GPT-2's LayerNorm, or RMSNorm (https://arxiv.org/abs/1910.07467): no mean subtraction and no bias,
    only the learned scale; cheaper, and as good in the speedrun and Llama."""
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=NORM_EPS)
    return nn.LayerNorm(config.n_embd, eps=NORM_EPS, bias=config.bias)


# the cos and sin of every (position, channel pair), (T, head_size / 2)
Rope = tuple[torch.Tensor, torch.Tensor]


class Rotary(nn.Module):
    """Rotary position embeddings (RoPE, https://arxiv.org/abs/2104.09864) for positions 0..max_len-1.

    Attention rotates each query and key by angles proportional to its position, so that their dot product
    depends on how far apart they are, not where they are. Nothing is learned: the tables are computed once,
    as non-persistent buffers, which follow the model's device but stay out of its state dict.
    """

    def __init__(self, head_size: int, max_len: int, base: float = ROPE_BASE):
        super().__init__()
        # channel pair i turns at frequency base^(-2i / head_size): from one radian per position to very slow
        inv_freq = base ** (-torch.arange(0, head_size, 2, dtype=torch.float64) / head_size)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    def forward(self, start: int | torch.Tensor, length: int) -> Rope:
        """The tables of positions start..start+length-1 (during decoding, start is the KV cache position).
        A `start` of shape (B, 1) gives each row its own positions: tables of shape (B, 1, length, hs / 2)."""
        if isinstance(start, int):
            return self.cos[start : start + length], self.sin[start : start + length]
        pos = start + torch.arange(length, device=start.device)
        return self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)


def apply_rotary(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate the channel pairs (i, i + head_size/2) of x (B, nh, T, hs): Llama's half-split layout."""
    cos, sin = rope
    # in fp32 and back: under autocast the queries are bf16 but the tables fp32, and SDPA needs one dtype
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).type_as(x)


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
        self.qk_norm = config.qk_norm
        self.layer = layer  # index into the KV cache

    def forward(
        self, x: torch.Tensor, rope: Rope | None = None, kv_cache: "Cache | None" = None
    ) -> torch.Tensor:
        B, T, C = x.size()  # batch size, sequence length, embedding dimensionality (n_embd)
        # q, k, v as views of the one projection, each (B, nh, T, hs): three ops, not seven (decoding runs
        # this per layer and token)
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if self.qk_norm:
            # unit-RMS queries and keys bound the attention logits, which keeps high learning rates stable
            q = F.rms_norm(q, (q.size(-1),), eps=NORM_EPS)
            k = F.rms_norm(k, (k.size(-1),), eps=NORM_EPS)
        if rope is not None:  # after the norm, as modded-nanogpt: a rotation keeps the RMS anyway
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        if kv_cache is None:
            dropout = self.dropout if self.training else 0.0
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, dropout_p=dropout)
        else:
            y = kv_cache.attend(self.layer, q, k, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """GPT-2's feed-forward, 4x wide, with GPT-2's GELU or ReLU² (`mlp="relu2"`)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU(approximate=config.gelu_approximate) if config.mlp == "gelu" else None
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.c_fc(x)
        # ReLU² (Primer, https://arxiv.org/abs/2109.08668): the speedrun's activation, it learns faster
        # than GELU
        x = self.gelu(x) if self.gelu is not None else F.relu(x).square()
        return self.dropout(self.c_proj(x))


def swiglu_hidden_size(n_embd: int) -> int:
    """8/3 * n_embd, rounded up to a multiple of 64:
    three such matrices hold as many weights as two 4x ones."""
    return 64 * math.ceil(8 * n_embd / (3 * 64))


class SwiGLU(nn.Module):
    """Llama's gated feed-forward (https://arxiv.org/abs/2002.05202): c_proj(silu(c_gate(x)) * c_fc(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = swiglu_hidden_size(config.n_embd)
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_gate = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.silu(self.c_gate(x)) * self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else MLP(config)

    def forward(
        self, x: torch.Tensor, rope: Rope | None = None, kv_cache: "Cache | None" = None
    ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), rope, kv_cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False  # training's memory option, not part of the architecture
        # Positions: GPT-2 learns an embedding per position; rotary attention needs none, so rope has no wpe.
        # Built in GPT-2's order (wte, wpe, blocks) so that a seed gives the same initial weights as before.
        wte = nn.Embedding(config.vocab_size, config.n_embd)
        wpe = {"wpe": nn.Embedding(config.block_size, config.n_embd)} if config.pos_emb == "learned" else {}
        self.transformer = nn.ModuleDict(dict(
            wte=wte,
            **wpe,
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=norm(config),
        ))
        self.rotary: Rotary | None = None
        if config.pos_emb == "rope":
            self.rotary = Rotary(config.n_embd // config.n_head, config.block_size)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            # Weight tying (https://paperswithcode.com/method/weight-tying): one matrix embeds and un-embeds.
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        # GPT-2 paper: scale the residual projections' init by 1/sqrt(2 * n_layer), two per block. Zero
        # instead (modded-nanogpt) starts every block as the identity: the residual stream is the embedding
        # at first.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight") and config.zero_init_proj:
                torch.nn.init.zeros_(p)
            elif name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if not config.tie_embeddings:
            # An untied head starts at zero, as in the speedrun: the first predictions are uniform (loss ln V)
            # and the head learns its own directions instead of echoing the random embedding.
            torch.nn.init.zeros_(self.lm_head.weight)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def get_num_params(self, non_embedding: bool = True) -> int:
        """Number of parameters, each shared tensor once. non_embedding=True (the N of MFU's 6N FLOPs per
        token) leaves out the lookup tables that do no matmul: the position embeddings, and the token
        embedding when it is not also the head. A tied token embedding counts, as the head."""
        n_params = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if "wpe" in self.transformer:
                n_params -= self.transformer.wpe.weight.numel()
            if not self.config.tie_embeddings:
                n_params -= self.transformer.wte.weight.numel()
        return n_params

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: "Cache | None" = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits and loss. With targets: logits of every position and the mean cross-entropy (targets of
        -1 are ignored). Without: logits of the last position only, shape (B, 1, vocab_size).

        With a `kv_cache`, `idx` holds the tokens that follow the `kv_cache.pos` cached ones; with a
        `SlotKVCache`, one token per slot, each following its own slot's.
        """
        x = self.hidden_states(idx, kv_cache)
        if targets is not None:
            logits = self.head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
            return logits, loss
        # inference-time mini-optimization: only forward the lm_head on the very last position
        logits = self.head(x[:, [-1], :])  # note: using list [-1] to preserve the time dim
        return logits, None

    def hidden_states(self, idx: torch.Tensor, kv_cache: "Cache | None" = None) -> torch.Tensor:
        """The final normalized hidden states (B, T, n_embd) that `head` turns into logits;
        scoring applies the head only at the positions it scores."""
        T = idx.size(1)
        # a SlotKVCache's is (n_slots, 1): each row its own
        past = kv_cache.pos if kv_cache is not None else 0
        longest = past if isinstance(past, int) else int(past.max())
        if longest + T > self.config.block_size:
            raise ValueError(
                f"cannot forward a sequence of length {longest + T}: the model's block_size is "
                f"{self.config.block_size}; crop the input to its last {self.config.block_size} tokens"
            )
        x = self.transformer.wte(idx)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(past, T)  # rotary: positions enter in attention, cached keys keep theirs
        else:
            x = x + self.transformer.wpe(past + torch.arange(T, dtype=torch.long, device=idx.device))
        x = self.transformer.drop(x)
        for block in self.transformer.h:
            if self.activation_checkpointing and self.training and torch.is_grad_enabled():
                # keep only the block's input; backward recomputes its activations (dropout masks included)
                x = torch.utils.checkpoint.checkpoint(block, x, rope, kv_cache, use_reentrant=False)
            else:
                x = block(x, rope, kv_cache)
        x = self.transformer.ln_f(x)
        if kv_cache is not None:
            kv_cache.advance(T)
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the final hidden states, soft-capped when the config says so."""
        logits = self.lm_head(x)
        cap = self.config.logit_softcap
        if cap is not None:
            # Soft-capping (Gemma 2, modded-nanogpt): logits bounded smoothly to (-cap, cap), so none can run
            # away and make the loss overconfident early in training.
            logits = cap * torch.tanh(logits / cap)
        return logits

    def crop_block_size(self, block_size: int) -> None:
        """Shrink the context length, e.g. to finetune GPT-2 (1024) on shorter blocks."""
        if not 0 < block_size <= self.config.block_size:
            raise ValueError(f"block_size must be in 1..{self.config.block_size}, got {block_size}")
        self.config.block_size = block_size
        if self.rotary is not None:
            self.rotary.cos, self.rotary.sin = self.rotary.cos[:block_size], self.rotary.sin[:block_size]
        else:
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size])

    def set_dropout(self, p: float) -> None:
        """Every dropout of the model at rate `p` (a finetuning choice, unlike the shape)."""
        self.config.dropout = p
        for module in self.modules():
            if isinstance(module, nn.Dropout):
                module.p = p
            elif isinstance(module, CausalSelfAttention):
                module.dropout = p

    def resize_vocab(self, vocab_size: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Grow the token embedding (and the head, tied or not) to `vocab_size` rows, e.g. for a chat
        template's special tokens; the new rows are `rows`, else drawn as GPT-2's init, and returned. The old
        rows keep their weights."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"resize_vocab only grows the vocabulary: {vocab_size} < {old}")
        wte = self.transformer.wte.weight
        if rows is None:
            rows = torch.empty(
                vocab_size - old, wte.size(1), dtype=wte.dtype, device=wte.device
            ).normal_(0.0, 0.02)
        rows = rows.to(wte)
        self.transformer.wte.weight = nn.Parameter(torch.cat([wte.detach(), rows]))
        self.transformer.wte.num_embeddings = vocab_size
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        else:
            head = self.lm_head.weight
            self.lm_head.weight = nn.Parameter(torch.cat([head.detach(), torch.zeros_like(rows)]))
        self.lm_head.out_features = vocab_size
        self.config.vocab_size = vocab_size
        return rows

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
        self,
        fwdbwd_per_iter: int,
        dt: float,
        dtype: torch.dtype | None = None,
        peak_flops: float | None = None,
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

    def generate_stream(
        self, idx: torch.Tensor, max_new_tokens: int, **kwargs: Any
    ) -> "Iterator[torch.Tensor]":
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
        """Write a directory that `transformers.GPT2LMHeadModel.from_pretrained` loads;
        see `hf.save_hf_gpt2`."""
        from gptforge.hf import save_hf_gpt2

        save_hf_gpt2(self, directory)

    @classmethod
    def from_checkpoint(cls, path: str | Path, override_args: dict[str, Any] | None = None) -> "GPT":
        """A gptforge or nanoGPT checkpoint, loaded without unpickling code; see `checkpoint.load_model`."""
        from gptforge.checkpoint import load_model

        return load_model(path, override_args)
