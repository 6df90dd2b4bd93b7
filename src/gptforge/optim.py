"""Optimizers and learning-rate schedules: how the weights move at each iteration.

`build_optimizer` is the one entry point the trainer calls: nanoGPT's AdamW, or Muon for the transformer's
hidden matrices with AdamW for everything else, always as one `torch.optim.Optimizer` so a checkpoint holds
one optimizer state. The schedules (`cosine_lr`, `wsd_lr`) give the learning rate of each iteration.

This module knows parameters and gradients, never data or checkpoint files.

References:
1) Keller Jordan, "Muon: An optimizer for hidden layers in neural networks" (2024):
   https://kellerjordan.github.io/posts/muon/ and https://github.com/KellerJordan/Muon
2) modded-nanogpt, the NanoGPT speedrun (Muon, the warm-up/stable/decay schedule, per-group LRs):
   https://github.com/KellerJordan/modded-nanogpt
"""

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

if TYPE_CHECKING:
    from gptforge.model import GPT

# The quintic Newton–Schulz coefficients of the reference: chosen to maximise the slope at zero, so five
# steps push every singular value into roughly [0.7, 1.2] rather than converging exactly to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


# -- learning-rate schedules --

def cosine_lr(it: int, learning_rate: float, warmup_iters: int, lr_decay_iters: int, min_lr: float) -> float:
    """nanoGPT's schedule: linear warm-up, cosine decay to `min_lr` at `lr_decay_iters`, then constant."""
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    if it > lr_decay_iters or lr_decay_iters <= warmup_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))  # from 1 to 0
    return min_lr + coeff * (learning_rate - min_lr)


def wsd_lr(
    it: int, learning_rate: float, warmup_iters: int, max_iters: int, cooldown_frac: float, min_lr: float
) -> float:
    """Warm-up, stable, decay (modded-nanogpt's schedule): linear warm-up as `cosine_lr`, `learning_rate` held
    constant, then a linear decay to `min_lr` over the last `cooldown_frac` of `max_iters`; `min_lr` after.

    Holding the peak LR for most of the run and cooling down at the end reaches a lower loss than a cosine for
    the same budget. The warm-up wins where it overlaps the cool-down.
    """
    if not 0.0 <= cooldown_frac <= 1.0:
        raise ValueError(f"cooldown_frac must be in [0, 1], got {cooldown_frac!r}")
    if it < warmup_iters:
        return learning_rate * (it + 1) / (warmup_iters + 1)
    cooldown_iters = cooldown_frac * max_iters
    decay_start = max_iters - cooldown_iters
    if it < decay_start:
        return learning_rate
    if it >= max_iters:
        return min_lr
    progress = (it - decay_start) / cooldown_iters  # from 0 at decay_start to 1 at max_iters
    return learning_rate + progress * (min_lr - learning_rate)


# -- Muon --

def zeropower_via_newtonschulz5(
    G: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """An approximately orthogonal matrix with G's singular vectors: U S' V^T for G = U S V^T, S' near 1.

    Five quintic Newton–Schulz steps instead of an SVD: only matmuls, and stable in bfloat16 (the default
    `dtype` of the iteration), which is what makes Muon cheap on accelerators. The result has G's dtype and
    shape; batches of matrices (..., m, n) are orthogonalised each on their own.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton–Schulz needs a matrix, got a tensor of shape {tuple(G.shape)}")
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:  # iterate on the wide side: X @ X^T is then the smaller Gram matrix
        X = X.mT
    # Dividing by the Frobenius norm bounds the spectral norm by 1, inside the iteration's basin.
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def _orthogonal_update(update: torch.Tensor, steps: int, dtype: torch.dtype) -> torch.Tensor:
    """Muon's update from a momentum matrix: orthogonalised, scaled by sqrt(max(1, rows / cols)) as in the
    reference, so tall and wide matrices move by a comparable RMS.

    Orthogonalisation needs the whole matrix. Under FSDP2 the update is a DTensor shard: every rank gathers
    the full matrix, orthogonalises it, and keeps its own shard of rank 0's result (`distribute_tensor`
    scatters it), so the shards always come from one matrix. Under DDP gradients are already all-reduced and
    every rank computes the same update.
    """
    if isinstance(update, DTensor):
        full = _orthogonal_update(update.full_tensor(), steps, dtype)
        return distribute_tensor(full, update.device_mesh, update.placements)
    matrix = update.reshape(update.size(0), -1)  # >2-D weights (e.g. convolutions) as (out, in)
    rows, cols = matrix.shape
    scale = max(1.0, rows / cols) ** 0.5
    return (zeropower_via_newtonschulz5(matrix, steps, dtype) * scale).view_as(update)


class Muon(torch.optim.Optimizer):
    """Muon (MomentUm Orthogonalized by Newton–Schulz) for hidden weight matrices, with AdamW alongside.

    For a matrix, SGD-Nesterov momentum is replaced by its nearest (semi-)orthogonal matrix before the step:
    every direction of the update moves by the same amount, so rare directions are not drowned by the
    dominant ones. `lr` is then in units of spectral norm per step. Weight decay is decoupled (AdamW-style).

    Muon is for hidden matrices only: embeddings, the output head, norms and biases train better with AdamW.
    Param groups with `kind="adamw"` are stepped by AdamW (`betas`, `eps`, decoupled `weight_decay`), so one
    optimizer, with one `state_dict`, covers the whole model. State lives in `self.state[p]`
    (`momentum_buffer`; `step`, `exp_avg`, `exp_avg_sq`), shaped (and sharded) like its parameter, which is
    what `state_dict()`/`load_state_dict()` and torch.distributed.checkpoint expect.

    `ns_dtype` is the dtype of the Newton–Schulz iteration (bfloat16 as in the reference; float32 for an
    exact-as-possible update). Each group gets `base_lr` (its peak LR) if it does not carry one.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_steps: int = 5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        ns_dtype: torch.dtype = torch.bfloat16,
    ):
        if lr < 0.0 or not 0.0 <= momentum < 1.0 or weight_decay < 0.0 or ns_steps < 1:
            raise ValueError(f"bad Muon settings: lr={lr}, momentum={momentum}, weight_decay={weight_decay}, "
                             f"ns_steps={ns_steps}")
        self.ns_dtype = ns_dtype
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                        weight_decay=weight_decay, betas=betas, eps=eps, kind="muon")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["kind"] not in ("muon", "adamw"):
            raise ValueError(f"a Muon param group's kind must be 'muon' or 'adamw', got {group['kind']!r}")
        if group["kind"] == "muon":
            shapes = [tuple(p.shape) for p in group["params"] if p.ndim < 2]
            if shapes:
                raise ValueError(f"Muon orthogonalises matrices; put parameters of shape {shapes} in an "
                                 "'adamw' group")
        group.setdefault("base_lr", group["lr"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.lerp_(p.grad, 1 - beta)
            # Nesterov: step along the gradient blended with the momentum it is about to join
            update = p.grad.lerp(buf, beta) if group["nesterov"] else buf
            update = _orthogonal_update(update, group["ns_steps"], self.ns_dtype).to(p.dtype)
            if wd:
                p.mul_(1 - lr * wd)
            p.add_(update, alpha=-lr)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        """torch.optim.AdamW's update (single-tensor form), per parameter."""
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step, exp_avg, exp_avg_sq = state["step"], state["exp_avg"], state["exp_avg_sq"]
            if wd:
                p.mul_(1 - lr * wd)
            exp_avg.lerp_(p.grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


# -- the trainer's entry point --

def build_optimizer(
    model: "GPT",
    kind: Literal["adamw", "muon"],
    learning_rate: float,
    weight_decay: float,
    betas: tuple[float, float],
    device_type: str,
    muon_lr: float = 0.02,
    muon_momentum: float = 0.95,
    embed_lr: float | None = None,
    head_lr: float | None = None,
    scalar_lr: float | None = None,
    muon_weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimizer of a GPT (the bare model, FSDP2-sharded or not; not a DDP or compile wrapper).

    - "adamw": exactly `model.configure_optimizers(weight_decay, learning_rate, betas, device_type)`.
    - "muon": one `Muon` optimizer with up to four groups, named in `group["name"]`:
      "matrices" (kind "muon"): every >= 2-D parameter under `transformer.h` (attention and MLP weights), at
      `muon_lr` with `muon_momentum` and `muon_weight_decay`;
      "embed" (AdamW): other >= 2-D parameters (token and position embeddings), at `embed_lr`;
      "head" (AdamW): the output head `lm_head.weight`, at `head_lr`; a tied head is the token embedding and
      goes here (an embedding-only LR can be far too large for an output layer);
      "scalars" (AdamW): norms' weights and all biases, at `scalar_lr`, no weight decay.
      `embed_lr`, `head_lr` and `scalar_lr` default to `learning_rate`; the AdamW groups use `betas` and
      decay the matrices by `weight_decay`.

    Contract with the trainer: every param group carries `base_lr`, its peak LR, and `kind` ("muon" or
    "adamw"); a schedule is applied as `group["lr"] = group["base_lr"] * factor`, with `factor` the schedule
    at peak 1 (e.g. `cosine_lr(it, 1.0, warmup_iters, lr_decay_iters, min_lr / learning_rate)`), so every
    group follows the same curve at its own scale. `base_lr` is saved in the optimizer's state dict: a
    resumed optimizer carries the checkpoint's LRs until they are set again.
    """
    if kind == "adamw":
        optimizer: torch.optim.Optimizer = model.configure_optimizers(
            weight_decay, learning_rate, betas, device_type
        )
        for group in optimizer.param_groups:
            group["kind"] = "adamw"
            group["base_lr"] = group["lr"]
        return optimizer
    if kind != "muon":
        raise ValueError(f"optimizer kind must be 'adamw' or 'muon', got {kind!r}")

    params: dict[str, list[torch.Tensor]] = {"matrices": [], "embed": [], "head": [], "scalars": []}
    head = getattr(model, "lm_head", None)
    head_weight = head.weight if head is not None else None
    for name, p in model.named_parameters():  # shared (tied) parameters are listed once
        if not p.requires_grad:
            continue
        if p.ndim < 2:
            params["scalars"].append(p)
        elif name.startswith("transformer.h."):
            params["matrices"].append(p)
        elif p is head_weight:
            params["head"].append(p)
        else:
            params["embed"].append(p)
    adamw = dict(kind="adamw", betas=betas, eps=1e-8)
    settings: dict[str, dict[str, Any]] = {
        "matrices": dict(kind="muon", lr=muon_lr, momentum=muon_momentum, weight_decay=muon_weight_decay),
        "embed": dict(adamw, lr=learning_rate if embed_lr is None else embed_lr, weight_decay=weight_decay),
        "head": dict(adamw, lr=learning_rate if head_lr is None else head_lr, weight_decay=weight_decay),
        "scalars": dict(adamw, lr=learning_rate if scalar_lr is None else scalar_lr, weight_decay=0.0),
    }
    groups = [
        dict(settings[name], name=name, params=ps, base_lr=settings[name]["lr"])
        for name, ps in params.items() if ps
    ]
    return Muon(groups, momentum=muon_momentum, betas=betas)
