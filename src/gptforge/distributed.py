"""Distributed training through PyTorch's own engine: torchrun's environment, process groups, DDP and FSDP2.

Everything that knows about ranks lives here, so the training loop reads the same for one process or many:
it asks `Dist` who it is, wraps the model once, and calls `all_reduce_mean` / `gather` / `barrier`.
"""

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from gptforge.errors import GptforgeError


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, local rank on its node, world size and device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        """Rank 0 logs and writes files."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1 or dist.is_initialized()


def setup(device: str, backend: str = "auto") -> Dist:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set), else a single process.

    On CUDA each process takes GPU `LOCAL_RANK`. Collectives time out (GPTFORGE_DIST_TIMEOUT_S, default 900 s)
    so that a rank that died makes the others fail instead of waiting forever.
    """
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.startswith("cuda") else "gloo"
    timeout = timedelta(seconds=float(os.environ.get("GPTFORGE_DIST_TIMEOUT_S", 900)))
    dist.init_process_group(backend=backend, timeout=timeout)
    return Dist(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, d: Dist, parallelism: str) -> nn.Module:
    """DDP (replicated weights, averaged gradients) or FSDP2 (`fully_shard`: weights, gradients and optimizer
    state sharded per block) over the job's processes; the model itself when there is one process."""
    if not d.enabled:
        return model
    if parallelism == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [d.local_rank] if d.device.startswith("cuda") else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if parallelism == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)  # the rest: embeddings (tied to the head), final norm
        return model
    raise GptforgeError(f"--parallelism={parallelism!r} is not one of ddp, fsdp")


def set_grad_sync(model: nn.Module, sync: bool) -> None:
    """Gradient accumulation: reduce gradients across processes only on the last micro-step."""
    if hasattr(model, "require_backward_grad_sync"):  # DDP
        model.require_backward_grad_sync = sync
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The sum of `value` over all processes (itself for one process)."""
    if d.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of `value` over all processes (gloo has no AVG, so a sum divided)."""
    return all_reduce_sum(value, d) / d.world_size


def any_rank(flag: bool, d: Dist) -> bool:
    """True on every process if `flag` is true on any: a stop request must stop all ranks at the same step."""
    if not d.enabled:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather(obj: Any, d: Dist) -> list[Any]:
    """Every process's `obj`, in rank order, on every process (e.g. per-rank RNG states for a checkpoint)."""
    if not d.enabled:
        return [obj]
    out: list[Any] = [None] * d.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(d: Dist) -> None:
    if d.enabled:
        dist.barrier()
