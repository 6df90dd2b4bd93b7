"""Int8 weight-only quantization for decoding on a CPU: a model's matmul weights as int8 with one scale per
output channel, multiplied by PyTorch's own CPU kernel (`aten._weight_int8pack_mm`).

A batch-1 decode step reads every weight once, so it is bound by how many bytes the weights are: int8 is a
quarter of fp32. Each output row of a weight matrix keeps its own scale (its largest magnitude / 127), so a
row of small weights is not flattened by a row of large ones. The kernel takes its activations in bfloat16
(its fast form on a CPU; float32 activations are ~10x slower there) and accumulates in float32; the layer
returns the dtype it was given, so norms, attention and the KV cache keep the model's dtype.

What is quantized: every `nn.Linear` (the attention and MLP projections) and the output head; a head tied to
the token embedding stays tied, the embedding reading its rows from the same int8 matrix (the per-row scales
of the head are the embedding's per-token scales). `docs/model.md` gives the measured quality.

This module knows the model's modules and torch; which commands offer it is `source.py`'s `--quantize`.
"""

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptforge.errors import GptforgeError
from gptforge.model import GPT

QUANTIZE_CHOICES = ("none", "int8")
ACTIVATION_DTYPE = torch.bfloat16  # what the kernel multiplies in, and the scales' dtype
KERNEL_MULTIPLE = 16  # the kernel reads the input dimension 16 at a time: others stay in floating point


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` (out, in) as int8 (out, in) and per-row scales (out,), weight ~= int8 * scale[:, None].
    A row of zeros gets scale 1 (its int8 row is zeros either way)."""
    w = weight.detach().float()
    absmax = w.abs().amax(dim=1)
    scales = torch.where(absmax > 0, absmax / 127, torch.ones_like(absmax))
    q = torch.round(w / scales[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales.to(ACTIVATION_DTYPE)


class Int8Linear(nn.Module):
    """`nn.Linear` with int8 weights (`weight`, (out, in)) and per-output-channel `scales`; the bias, if any,
    stays in floating point. Its output differs from the float layer's by the rounding of each weight to its
    row's 255 levels and of the input and output to bfloat16 (tests/test_quantize.py checks the bound)."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.size(1), weight.size(0)
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(*quantize_rows(linear.weight), linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features).to(self.scales.dtype).contiguous()
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales)
        y = y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """The token embedding of a tied model, read from its quantized head: row i is int8 row i times scale i,
    in `dtype`."""

    def __init__(self, head: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.head = head  # the model's own head module, shared as the float weights were
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(idx, self.head.weight).to(self.dtype)
        return rows * self.head.scales[idx].unsqueeze(-1).to(self.dtype)


def check_quantize(quantize: str, device: str | None = None, dtype: str | None = None) -> None:
    """`--quantize` must be a known scheme; int8 runs on the CPU, in float32 or bfloat16."""
    if quantize not in QUANTIZE_CHOICES:
        raise GptforgeError(f"--quantize={quantize!r} is not one of {', '.join(QUANTIZE_CHOICES)}")
    if quantize == "none":
        return
    if device is not None and device != "cpu":
        raise GptforgeError(f"--quantize={quantize} runs on the CPU (its kernel is PyTorch's CPU one): "
                            f"use --device=cpu, or leave --quantize out on {device}")
    if dtype is not None and dtype not in ("float32", "bfloat16"):
        raise GptforgeError(f"--quantize={quantize} works with --dtype=float32 or bfloat16, not {dtype}: "
                            "PyTorch's int8 kernel is several times slower with float16 activations")


def quantize(model: GPT, scheme: str = "int8") -> GPT:
    """`model` with its matmul weights quantized in place (`scheme` "none": as it is). Call it after placing
    the model in its dtype on the CPU; for inference only."""
    check_quantize(scheme)
    if scheme == "none":
        return model
    tied = model.transformer.wte.weight is model.lm_head.weight
    dtype = model.lm_head.weight.dtype
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.Linear) and child.in_features % KERNEL_MULTIPLE == 0:
                setattr(parent, name, Int8Linear.from_linear(child))
    if tied and isinstance(model.lm_head, Int8Linear):
        model.transformer.wte = Int8Embedding(model.lm_head, dtype)
    return model
