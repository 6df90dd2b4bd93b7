"""Checkpoint files: plain tensors and builtins, written atomically, read without unpickling any code.

A checkpoint is nanoGPT's layout, `torch.save` of a dict with `model_args` (the `GPTConfig` fields) and
`model` (the state dict), plus whatever else the writer adds (training adds the optimizer, the config, the
data position and every RNG state). It is read with `torch.load(weights_only=True)`, which accepts tensors,
dicts, lists, numbers and strings and refuses anything that would run code.

A run directory holds `ckpt.pt`, the latest checkpoint (the name nanoGPT uses), and `best.pt`, the one with
the lowest val loss. Each is replaced by an atomic rename, so a crash at any moment leaves both loadable.
Beside them, the other weight files gptforge reads (safetensors, a weights-only `pytorch_model.bin`, JSON
configs), each with its cause named when it is broken. This module knows files and the model's state dict; it
imports the model and nothing of training, data or commands.
"""

import json
import os
import pickle
import random
import shutil
import zipfile
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file

from gptforge.atomic import atomic_path
from gptforge.errors import GptforgeError
from gptforge.model import GPT, GPTConfig

CHECKPOINT_NAME = "ckpt.pt"  # the latest
BEST_NAME = "best.pt"
LEGACY_HEAD = b"\x80\x02\x8a"  # PROTO 2, LONG1: how torch.save's legacy format begins
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


def read_json(path: Path) -> Any:
    """A JSON file's value; a file that is not JSON is an error naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptforgeError(f"{path} is not valid JSON ({e}); restore it or export the model again") from None


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or damaged one is an error naming it."""
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise GptforgeError(
            f"{path} is not a readable safetensors file ({e}); is the file complete?"
        ) from None


def read_weights_bin(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a `pytorch_model.bin` (a pickle), loaded weights-only: a pickle that would run code is
    refused, and a damaged one is an error naming it."""
    try:
        # weights_only: a .bin is a pickle, and a pickle from the internet must never run code
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptforgeError(f"{path} is a pickle that names code to run ({reason}); gptforge never runs it: "
                            "use the model's model.safetensors instead") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise GptforgeError(f"{path} is not a readable weights file ({type(e).__name__}: {e})") from None


def check_shapes(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Every tensor of `state_dict` that `model` has must have its shape: else an error naming the first that
    differs and `what` implies the model's shape (its config)."""
    expected = model.state_dict()
    for key, value in state_dict.items():
        if key in expected and tuple(value.shape) != tuple(expected[key].shape):
            raise GptforgeError(f"{what} imply {key} of shape {tuple(expected[key].shape)}, but the file "
                                f"holds {tuple(value.shape)}: the weights and the config do not belong "
                                "together")


def save_model(model: nn.Module, path: str | Path, **extra: Any) -> None:
    """Atomically write the model (unwrapped: no `_orig_mod.` prefixes) and `extra` entries to `path`."""
    model = unwrap_model(model)
    if not isinstance(model, GPT):
        raise TypeError(f"save_model needs a gptforge GPT, got {type(model).__name__}")
    payload = {"model_args": asdict(model.config), "model": model.state_dict(), **extra}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def checkpoint_file(path: str | Path, which: Literal["latest", "best"] = "latest") -> Path:
    """The checkpoint file that `path` names: itself, or a run directory's latest or best one.

    A run directory without `best.pt` (nanoGPT's, or one stopped before its first eval) gives its latest.
    """
    path = Path(path)
    if path.is_dir():
        best = path / BEST_NAME
        path = best if which == "best" and best.is_file() else path / CHECKPOINT_NAME
    if not path.is_file():
        raise GptforgeError(f"no checkpoint at {path}: pass a checkpoint file or a run directory with "
                            f"{CHECKPOINT_NAME}")
    return path


def save_checkpoint(out_dir: str | Path, payload: dict[str, Any], best: bool, keep_last: int = 0) -> None:
    """Write `payload` as the run's latest checkpoint (and, if `best`, as its best) atomically.

    With `keep_last`, each save is also kept as `ckpt-ITER.pt` (a hard link: no extra disk), pruned to the
    newest `keep_last + 1`: the latest and `keep_last` older ones.
    """
    out_dir = Path(out_dir)
    latest = out_dir / CHECKPOINT_NAME
    with atomic_path(latest) as tmp:
        torch.save(payload, tmp)
    if best:
        _link_atomically(latest, out_dir / BEST_NAME)
    if keep_last:
        _link_atomically(latest, out_dir / f"ckpt-{payload['iter_num']:08d}.pt")
        for old in sorted(out_dir.glob("ckpt-*.pt"))[: -(keep_last + 1)]:
            old.unlink()


def _link_atomically(source: Path, target: Path) -> None:
    """Make `target` the same file as `source` (a hard link, or a copy where links are not supported)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def rng_state() -> dict[str, Any]:
    """Every random state training draws from, as weights_only-loadable values."""
    numpy_state = np.random.get_bit_generator().state
    numpy_state["state"] = {k: v.tolist() if isinstance(v, np.ndarray) else v
                            for k, v in numpy_state["state"].items()}
    return {
        "python": random.getstate(),
        "numpy": numpy_state,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    random.setstate(_tuples(state["python"]))
    numpy_state = dict(state["numpy"])
    numpy_state["state"] = {k: np.asarray(v, dtype=np.uint32) if isinstance(v, list) else v
                            for k, v in numpy_state["state"].items()}
    np.random.get_bit_generator().state = numpy_state
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value: Any) -> Any:
    """random.setstate wants the tuples it gave; a checkpoint may hand back lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu", which: Literal["latest", "best"] = "latest"
) -> dict[str, Any]:
    """Read a checkpoint file, or a run directory's latest or best, refusing anything that needs
    unpickling."""
    path = checkpoint_file(path, which)
    kind = _file_kind(path)
    try:
        # mmap (zip checkpoints only): tensors are read from the file as they are used, not all into memory
        # first
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptforgeError(
            f"{path} is not a safe checkpoint: loading it would unpickle arbitrary objects ({reason}); "
            "gptforge never does that. Re-save its tensors with torch.save of plain dicts in a trusted "
            "environment"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        what = {"zip": "a damaged zip archive", "pickle": "a pickle but not one torch.save wrote"}[kind]
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GptforgeError(f"{path} is not a readable checkpoint: it is {what} ({reason})") from None
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_args"), dict) or "model" not in ckpt:
        raise GptforgeError(
            f"{path} is not a gptforge or nanoGPT checkpoint: it lacks 'model_args' and 'model'"
        )
    return ckpt


def _file_kind(path: Path) -> Literal["zip", "pickle"]:
    """torch.save's zip format, or its legacy pickle format; an empty, truncated or foreign file is an error
    naming which it is."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise GptforgeError(f"{path} is not a readable checkpoint: it is empty (0 bytes), its write never "
                            "finished; use another checkpoint or retrain")
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            raise GptforgeError(f"{path} is not a readable checkpoint: it is truncated, a zip archive "
                                "without its end (was it still being written or copied?); use another "
                                "checkpoint or retrain")
        return "zip"
    # torch.save's legacy format: a protocol-2 pickle of its magic number first
    if head.startswith(LEGACY_HEAD):
        return "pickle"
    if head[0] == 0x80:  # a pickle's protocol opcode
        raise GptforgeError(f"{path} is not a readable checkpoint: it is a plain pickle (pickle.dump), not "
                            "torch.save's format, and gptforge never unpickles one; re-save it with "
                            "torch.save")
    raise GptforgeError(f"{path} is not a readable checkpoint: it is neither torch.save's zip format nor its "
                        "legacy one")


def load_model(
    path: str | Path, override_args: dict[str, Any] | None = None, which: Literal["latest", "best"] = "best"
) -> GPT:
    """A `GPT` from a gptforge or nanoGPT checkpoint (a run directory gives its best), on the CPU."""
    return model_from_checkpoint(load_checkpoint(path, which=which), path, override_args)


def saved_model_args(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's `GPTConfig` fields. nanoGPT's carry no `gelu_approximate`: nanoGPT always trained with
    the exact erf GELU, so a missing field means "none"."""
    return {"gelu_approximate": "none", **ckpt["model_args"]}


def model_from_checkpoint(
    ckpt: dict[str, Any], path: str | Path, override_args: dict[str, Any] | None = None
) -> GPT:
    """The `GPT` of a checkpoint already read from `path` (named in errors).

    `override_args` replaces config fields (e.g. `{"dropout": 0.0}`).
    """
    model_args = {**saved_model_args(ckpt), **(override_args or {})}
    model = GPT(GPTConfig.from_dict(model_args))
    state_dict = clean_state_dict(ckpt["model"])
    check_shapes(model, state_dict, f"{path}: its model_args")
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # a tied head is the embedding: writers that store the shared tensor once omit it
    tied = model.config.tie_embeddings and "transformer.wte.weight" in state_dict
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing or unexpected:
        raise GptforgeError(
            f"{path} does not match its own model_args: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model
