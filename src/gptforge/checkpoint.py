"""Checkpoint files: plain tensors and builtins, written atomically, read without unpickling any code.

A checkpoint is nanoGPT's layout, `torch.save` of a dict with `model_args` (the `GPTConfig` fields) and
`model` (the state dict), plus whatever else the writer adds. It is read with `torch.load(weights_only=True)`,
which accepts tensors, dicts, lists, numbers and strings and refuses anything that would run code.
"""

import pickle
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from gptforge.atomic import atomic_path
from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig

CHECKPOINT_NAME = "ckpt.pt"
# Prefixes that wrappers add to state-dict keys: torch.compile and DistributedDataParallel.
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# Causal-mask buffers that nanoGPT (without flash attention) and old HF GPT-2 checkpoints carry.
_MASK_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under torch.compile (`_orig_mod`) and DDP (`module`) wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def clean_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and drop causal-mask buffers, so any writer's state dict loads into `GPT`."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        if not key.endswith(_MASK_BUFFER_SUFFIXES):
            clean[key] = value
    return clean


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """Atomically write the model (unwrapped: no `_orig_mod.` prefixes) and `extra` entries to `path`."""
    model = unwrap_model(model)
    if not isinstance(model, GPT):
        raise TypeError(f"save_model needs a gptforge GPT, got {type(model).__name__}")
    payload = {"model_args": asdict(model.config), "model": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file, or the `ckpt.pt` in a run directory, refusing anything that needs unpickling."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise GptforgeError(f"no checkpoint at {path}: pass a checkpoint file or a run directory with {CHECKPOINT_NAME}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptforgeError(
            f"{path} is not a safe checkpoint: loading it would unpickle arbitrary objects ({reason}); "
            "gptforge never does that. Re-save its tensors with torch.save of plain dicts in a trusted environment"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise GptforgeError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e}); is the file complete?") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_args"), dict) or "model" not in ckpt:
        raise GptforgeError(f"{path} is not a gptforge or nanoGPT checkpoint: it lacks 'model_args' and 'model'")
    return ckpt


def load_model(path: str | Path, override_args: dict[str, Any] | None = None) -> GPT:
    """A `GPT` from a gptforge or nanoGPT checkpoint, on the CPU.

    nanoGPT checkpoints carry no `gelu_approximate`: nanoGPT always trained with the exact erf GELU, so a
    missing field means "none". `override_args` replaces config fields (e.g. `{"dropout": 0.0}`).
    """
    ckpt = load_checkpoint(path)
    model_args = {"gelu_approximate": "none", **ckpt["model_args"], **(override_args or {})}
    model = GPT(GPTConfig.from_dict(model_args))
    state_dict = clean_state_dict(ckpt["model"])
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k != "lm_head.weight" or "transformer.wte.weight" not in state_dict]
    if missing or unexpected:
        raise GptforgeError(
            f"{path} does not match its own model_args: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
