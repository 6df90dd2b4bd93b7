"""The memory plan of a training run: what its parameters, gradients, optimizer state and activations take,
estimated before the first step, and what would fit when a device runs out.

Activations are the tensors a forward pass keeps for backward, per row of `block_size` tokens, counted from
the model's shape the way eager PyTorch keeps them (fused attention, so no T x T matrix without dropout);
torch.compile usually keeps less. This module knows model shapes and dtypes, nothing of data or the loop.
"""

import dataclasses

import torch

from gptforge.model import GPT, swiglu_hidden_size

GIB = 2**30
FP32_BYTES = 4


def gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one process's training state, and of one row's activations in a micro-batch."""

    parameters: int
    gradients: int
    optimizer: int
    activations_per_row: int
    batch_size: int

    @property
    def state(self) -> int:
        """What stays allocated whatever the batch: parameters, gradients, optimizer state."""
        return self.parameters + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.state + self.activations_per_row * self.batch_size

    def describe(self) -> str:
        activations = self.activations_per_row * self.batch_size
        return (f"memory plan: parameters {gib(self.parameters)}, gradients {gib(self.gradients)}, "
                f"optimizer state {gib(self.optimizer)}, activations {gib(activations)} per micro-batch of "
                f"{self.batch_size} rows: ~{gib(self.total)} in all (an estimate)")

    def largest_batch(self, available: int) -> int:
        """The most rows per micro-batch whose plan fits in `available` bytes (0: not even one)."""
        return max(0, (available - self.state) // self.activations_per_row)


def plan_memory(model: GPT, optimizer: torch.optim.Optimizer, batch_size: int, block_size: int,
                compute_dtype: torch.dtype, activation_checkpointing: bool = False) -> MemoryPlan:
    """The plan of training `model` (its trained parameters with `optimizer`) on micro-batches of
    `batch_size` rows of `block_size` tokens, its matmuls in `compute_dtype`."""
    params = {id(p): p for p in model.parameters()}.values()  # a tied weight once
    trained = {id(p) for p in params if p.requires_grad}
    # AdamW keeps two moments per parameter, Muon's matrices one momentum buffer (optim.build_optimizer)
    states = sum((1 if group.get("kind") == "muon" else 2) * p.numel() * p.element_size()
                 for group in optimizer.param_groups for p in group["params"] if id(p) in trained)
    per_token = activation_bytes_per_token(model, block_size, compute_dtype, activation_checkpointing)
    return MemoryPlan(
        parameters=sum(p.numel() * p.element_size() for p in params),
        gradients=sum(p.numel() * p.element_size() for p in params if id(p) in trained),
        optimizer=states,
        activations_per_row=per_token * block_size,
        batch_size=batch_size,
    )


def activation_bytes_per_token(model: GPT, block_size: int, compute_dtype: torch.dtype,
                               activation_checkpointing: bool = False) -> int:
    """Bytes per token that one training step holds between forward and backward: what each block saves,
    the head's log-probabilities and, at the start of backward, their gradient."""
    cfg = model.config
    h, c = cfg.n_embd, torch.finfo(compute_dtype).bits // 8
    residual = next(model.parameters()).element_size()  # the residual stream stays in the weights' dtype
    # attention: the qkv input, q/k/v, the attention output and c_proj's input (+ normalised, rotated q, k)
    attention = 6 * h + 2 * h * (cfg.qk_norm + (cfg.pos_emb == "rope"))
    # the feed-forward: its input, then two 4h tensors (pre- and post-activation), or SwiGLU's four
    mlp = h + (4 * swiglu_hidden_size(h) if cfg.mlp == "swiglu" else 8 * h)
    block = 2 * h * residual + (attention + mlp) * c  # the two norms' inputs are the residual stream
    if cfg.dropout > 0:  # the masks (a byte an element), and the attention weights, dropped weights and mask
        block += 2 * h + 3 * cfg.n_head * block_size * FP32_BYTES  # of the math kernel SDPA falls back to
    blocks = cfg.n_layer * h * residual + block if activation_checkpointing else cfg.n_layer * block
    # the final norm's input, lm_head's input, fp32 log-probabilities and their gradient (+ the soft-cap's)
    head = h * residual + h * c + 2 * cfg.vocab_size * FP32_BYTES
    if cfg.logit_softcap is not None:
        head += cfg.vocab_size * c
    return blocks + head


def oom_message(plan: MemoryPlan, available: int, gradient_accumulation_steps: int, world_size: int,
                asked: str | None = None) -> str:
    """One line for a device that ran out of memory: what the plan needs, the knobs, and a size that fits
    (`available`: the device's bytes), keeping the tokens per step where it can."""
    rows = plan.batch_size * gradient_accumulation_steps // world_size  # this process's rows per step
    fits = plan.largest_batch(int(available * 0.9))  # the allocator's fragmentation and CUDA's own use
    if fits >= plan.batch_size:  # the plan underestimates this run: at least halve what ran out
        fits = plan.batch_size // 2
    size = next((b for b in range(min(fits, rows), 0, -1) if rows % b == 0), 0)
    head = (f"out of GPU memory{f' (it asked for {asked} more)' if asked else ''}: "
            f"the plan needs ~{gib(plan.total)} of {gib(available)} at --batch_size={plan.batch_size}")
    if size:
        return (f"{head}; --batch_size={size} --gradient_accumulation_steps={rows // size * world_size} "
                "would fit with the same tokens per step, or try --activation_checkpointing=True or a "
                "lower --block_size")
    return (f"{head}; even --batch_size=1 does not fit: try --activation_checkpointing=True, a lower "
            "--block_size or a smaller model (--n_layer, --n_embd)")
