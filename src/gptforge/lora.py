"""LoRA, low-rank adaptation (Hu et al. 2021, https://arxiv.org/abs/2106.09685), for gptforge's GPT.

The pretrained weights stay frozen; each adapted Linear learns a low-rank update instead,
W + (alpha / rank) B A, with A (rank, in) and B (out, rank). B starts at zero, so an adapted model starts as
exactly its base. Only A and B are trained, checkpointed and held by the optimizer: for GPT-2 small at rank 8
on c_attn, about 0.24% of the parameters. `merge_lora` folds the update into the weights, and the model is a
plain GPT again.

State-dict layout: an adapted layer keeps its base Linear as `base`, so its weight's key becomes
`...c_attn.base.weight` beside `...c_attn.lora_A` and `...c_attn.lora_B`. `base_state_dict` gives the base
weights under their original keys (the keys of the checkpoint it came from), `lora_state_dict` only the
adapters.

This module knows the GPT's module names (`transformer.h`, the Linears of attention and MLP) and tensors,
nothing of checkpoint files, optimizers or the command line: the trainer saves `lora_state_dict` and records
`base_fingerprint`, the CLI prints `trainable_report`.
"""

import hashlib
import math
from collections.abc import Iterable, Sequence

import torch
import torch.nn as nn

from gptforge.errors import GptforgeError

# The Linears of a block that can be adapted, by name. "c_proj" is both output projections, attention's and
# the MLP's (as peft matches names by suffix); "c_gate" exists only in the SwiGLU MLP.
TARGETS = ("c_attn", "c_proj", "c_fc", "c_gate")
# Attention's fused query-key-value projection only: peft's default for GPT-2. The paper adapts W_q and W_v
# and litgpt defaults to query and value; GPT-2 fuses them (with W_k) into c_attn, so c_attn is that choice.
DEFAULT_TARGETS = ("c_attn",)
ADAPTERS = ("lora_A", "lora_B")  # the parameter names of a LoRALinear's own tensors


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + dropout(x) A^T B^T * alpha / rank."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))
        # A as nn.Linear initialises its weight (and as peft and litgpt do), B zero: the update starts at zero
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # through the rank-r bottleneck, never forming the (out, in) update: two thin matmuls
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain Linear computing the same function, W + scale * B A (the bias kept), in the base's dtype
        and device and with its requires_grad; this layer is left unchanged."""
        base = self.base
        w = base.weight
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None,
                           dtype=w.dtype, device=w.device)
        # summed in fp32 and rounded once, so a bf16 base loses no more than its own rounding
        linear.weight.copy_(w.float() + self.scale * (self.lora_B.float() @ self.lora_A.float()))
        if base.bias is not None:
            linear.bias.copy_(base.bias)
        return linear.requires_grad_(w.requires_grad)


def apply_lora(
    model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = DEFAULT_TARGETS, dropout: float = 0.0
) -> int:
    """Freeze every parameter of `model` (a GPT) and wrap each Linear of its blocks named in `targets` in a
    LoRALinear; returns how many were wrapped. A target this model lacks (c_gate without SwiGLU) is skipped,
    as long as one target matches."""
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise GptforgeError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise GptforgeError(f"LoRA rank must be a whole number >= 1, got {rank!r}")
    if not alpha > 0:
        raise GptforgeError(f"LoRA alpha must be positive, got {alpha!r}")
    if not 0 <= dropout < 1:
        raise GptforgeError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
    blocks = model.transformer.h
    if any(isinstance(m, LoRALinear) for m in blocks.modules()):
        raise GptforgeError("the model already has LoRA adapters; merge_lora them first, "
                            "or start from its base")
    # (parent, attribute) of every Linear of the blocks, collected before any module is replaced
    linears = [(parent, name) for parent in blocks.modules() for name, child in parent.named_children()
               if isinstance(child, nn.Linear)]
    chosen = [(parent, name) for parent, name in linears if name in targets]
    if not chosen:
        present = sorted({name for _, name in linears} & set(TARGETS), key=TARGETS.index)
        raise GptforgeError(f"LoRA targets {', '.join(targets) or '(none)'} match no layer of this model; "
                            f"its layers are {', '.join(present)}")
    model.requires_grad_(False)
    for parent, name in chosen:
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout))
    return len(chosen)


def _is_adapter(key: str) -> bool:
    return key.rpartition(".")[2] in ADAPTERS


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only, under their keys in `model.state_dict()`
    (`transformer.h.0.attn.c_attn.lora_A`, ...): what a LoRA run checkpoints."""
    return {k: v for k, v in model.state_dict().items() if _is_adapter(k)}


def _listed(keys: Iterable[str], most: int = 3) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load adapter tensors (from `lora_state_dict`) into a model adapted the same way: the same targets and
    rank. Strict: a missing or unexpected adapter key, or a shape that differs, is an error."""
    params = {k: p for k, p in model.named_parameters() if _is_adapter(k)}
    if not params:
        raise GptforgeError("the model has no LoRA adapters to load into; apply_lora it first")
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if problems:
        raise GptforgeError(f"the LoRA adapters do not fit this model ({'; '.join(problems)}); "
                            "adapt it with the targets the adapters were trained with")
    wrong = [k for k, p in params.items() if state[k].shape != p.shape]
    if wrong:
        k = sorted(wrong)[0]
        raise GptforgeError(f"the LoRA adapter {k} has shape {tuple(state[k].shape)}, the model's "
                            f"{tuple(params[k].shape)}; adapt it with the rank the adapters were "
                            "trained with")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k])


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear of `model` by its merged Linear, in place, and return the model: a plain GPT
    again, whose state-dict keys are its base's. Parameters keep their requires_grad (the merged weights stay
    frozen as the base was); unfreeze them to train the whole model further."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.merged())
    return model


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's tensors under their original keys (`...c_attn.weight`, not `...c_attn.base.weight`),
    without the adapters: equal to the base checkpoint's state dict. A model without adapters gives its
    own."""
    wrapped = {name for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    out = {}
    for key, tensor in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        if owner in wrapped:  # lora_A, lora_B
            continue
        layer, _, attr = owner.rpartition(".")
        out[f"{layer}.{leaf}" if attr == "base" and layer in wrapped else key] = tensor
    return out


def base_fingerprint(state_dict: dict[str, torch.Tensor]) -> str:
    """A sha256 of a base model's tensors, each key with its dtype, shape and bytes in sorted order: a LoRA
    run records it to refuse adapters onto another base. Give it `base_state_dict(model)` for an adapted
    model."""
    if any(_is_adapter(k) for k in state_dict):
        raise ValueError("base_fingerprint was given LoRA adapters; pass base_state_dict(model)")
    h = hashlib.sha256()
    for key in sorted(state_dict):
        t = state_dict[key].detach()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainable_report(model: nn.Module) -> dict[str, int]:
    """What training this model costs, for the CLI to print: its trainable and total parameters (a tied
    embedding once) and the bytes of AdamW's state, two fp32 moments per parameter, for the trainable ones
    against finetuning the whole base model (every parameter but the adapters)."""
    named = list(model.named_parameters())
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    base = sum(p.numel() for k, p in named if not _is_adapter(k))
    return {
        "trainable_params": trainable,
        "total_params": sum(p.numel() for _, p in named),
        "optimizer_state_bytes": 2 * 4 * trainable,
        "full_finetune_optimizer_state_bytes": 2 * 4 * base,
    }
