"""Configuration: `TrainConfig`, config files (TOML, or nanoGPT's Python files read as data) and
nanoGPT-style `--key=value` options applied to dataclasses.

Values are parsed with `ast.literal_eval` (never executed) and coerced to the field's declared type, so
`--max_iters=1e4` gives the int 10000 and `--top_k=None` works for optional fields.
"""

import ast
import dataclasses
import difflib
import operator
import tomllib
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

import torch

from gptforge.errors import GptforgeError

T = TypeVar("T")


def split_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split `argv` into positional arguments and a `{key: raw value}` dict of `--key=value` options; a bare
    `--flag` is `--flag=True`."""
    positional, options = [], {}
    for arg in argv:
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        key, sep, value = arg[2:].partition("=")
        if not key:
            raise GptforgeError(f"option {arg!r} is not of the form --key=value")
        if not sep:
            value = "True"
        options[key.replace("-", "_")] = value
    return positional, options


def _parse_literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word such as --device=cuda is a string


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Convert `value` to the type `annotation` names, or raise a one-line error about `key`."""
    if isinstance(annotation, str):
        raise TypeError(f"field {key} has a string annotation; gptforge config classes use real types")
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(annotation)
        if value is None and type(None) in members:
            return None
        kinds = [m for m in members if m is not type(None)]
        for member in kinds:
            try:
                return coerce(value, member, key)
            except GptforgeError as e:
                if len(kinds) == 1:  # an optional value: the one type's own message, naming None as an option
                    raise GptforgeError(f"{e}, or None" if type(None) in members else str(e)) from None
        raise GptforgeError(f"--{key}={value!r} is not a valid {_type_name(annotation)}")
    if origin is typing.Literal:
        if value not in typing.get_args(annotation):
            choices = ", ".join(repr(c) for c in typing.get_args(annotation))
            raise GptforgeError(f"--{key}={value!r} is not one of {choices}")
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise GptforgeError(f"--{key}={value!r} is not a bool: use True or False")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            raise GptforgeError(f"--{key}={value!r} is not an integer")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GptforgeError(f"--{key}={value!r} is not a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise GptforgeError(f"--{key}={value!r} is not a string")
        return value
    if origin in (list, tuple) or annotation in (list, tuple):
        if not isinstance(value, list | tuple):
            raise GptforgeError(f"--{key}={value!r} is not a list")
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        items = [v if item_type is Any else coerce(v, item_type, key) for v in value]
        return tuple(items) if (origin or annotation) is tuple else items
    return value


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def closest_key(key: str, valid: typing.Iterable[str]) -> str:
    """A hint naming the valid key closest to `key`, or the empty string."""
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean --{match[0]}?)" if match else ""


def apply_overrides(obj: T, overrides: dict[str, Any], source: str = "") -> T:
    """Return a copy of dataclass `obj` with `overrides` applied.

    `source` names the config file the overrides come from, for error messages. Without it they are command-line
    text, and strings are parsed as literals (`--max_iters=1e4`); a file's values already have their types, so
    `max_iters = "1e4"` in a file is a wrong type, not a number.
    """
    hints = typing.get_type_hints(type(obj))
    fields = {f.name for f in dataclasses.fields(obj)}  # type: ignore[arg-type]
    where = f"{source}: " if source else ""
    changes = {}
    for key, value in overrides.items():
        if key not in fields:
            in_source = f" in {source}" if source else ""
            raise GptforgeError(f"unknown option --{key}{in_source}{closest_key(key, fields)}")
        if isinstance(value, str) and not source:
            parsed = _parse_literal(value)
            # A str field keeps the raw text unless it was written as a quoted string literal.
            value = parsed if hints[key] is not str or isinstance(parsed, str) else value
        try:
            changes[key] = coerce(value, hints[key], key)
        except GptforgeError as e:
            raise GptforgeError(f"{where}{e}") from None
    try:
        return dataclasses.replace(obj, **changes)  # type: ignore[type-var]
    except GptforgeError as e:  # a check across fields, such as a value out of range
        raise GptforgeError(f"{where}{e}") from None


# torch.compile's modes; "max-autotune-no-cudagraphs" also tunes the matmuls (Inductor's C++ GEMM templates on CPU)
CompileMode = typing.Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclasses.dataclass
class TrainConfig:
    """Every key of nanoGPT's train.py, same names and defaults, plus gptforge's own (marked)."""

    # I/O
    out_dir: str = "out"
    eval_interval: int = 2000
    log_interval: int = 1
    eval_iters: int = 200
    eval_only: bool = False  # if True, evaluate once and exit
    always_save_checkpoint: bool = True  # also write the latest checkpoint when val loss did not improve
    init_from: str = "scratch"  # 'scratch', 'resume', 'gpt2*' or a local HF GPT-2 directory
    # wandb logging
    wandb_log: bool = False
    wandb_project: str = "owt"
    wandb_run_name: str = "gpt2"
    # data
    dataset: str = "openwebtext"
    data_dir: str = "data"  # gptforge: datasets live in data_dir/dataset
    gradient_accumulation_steps: int = 5 * 8  # micro-steps per optimizer step, over all processes together
    batch_size: int = 12  # micro-batch size: rows per micro-step per process
    block_size: int = 1024
    # model
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # for pretraining 0 is good, for finetuning try 0.1+
    bias: bool = False  # biases in LayerNorm and Linear layers
    # AdamW
    learning_rate: float = 6e-4
    max_iters: int = 600000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip gradients at this norm; 0.0 disables
    # learning rate decay
    decay_lr: bool = True
    warmup_iters: int = 2000
    lr_decay_iters: int = 600000  # ~= max_iters per Chinchilla
    min_lr: float = 6e-5  # ~= learning_rate / 10 per Chinchilla
    # system
    backend: str = "auto"  # 'nccl' on GPUs, 'gloo' on CPUs; auto picks by device
    device: str = "auto"  # 'cpu', 'cuda', 'cuda:1', 'mps'; auto: cuda, else mps, else cpu
    dtype: str = "auto"  # 'float32', 'bfloat16', 'float16'; auto: bf16 on CUDA if supported, else fp16; fp32 on CPU
    # torch.compile the model; None: on CUDA only (on a CPU it measured slower per step, docs/benchmarks.md)
    compile: bool | None = None
    compile_mode: CompileMode = "default"
    # gptforge
    seed: int = 1337
    keep_last: int = 0  # older checkpoints kept besides the latest and the best
    parallelism: typing.Literal["ddp", "fsdp"] = "ddp"
    # gptforge: modern architecture (model.GPTConfig; the defaults are GPT-2) and optimizer, see docs/speedrun.md
    pos_emb: typing.Literal["learned", "rope"] = "learned"
    norm: typing.Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: typing.Literal["gelu", "relu2", "swiglu"] = "gelu"
    gelu_approximate: typing.Literal["tanh", "none"] = "tanh"  # GPT-2's tanh GELU; "none": nanoGPT's exact erf
    qk_norm: bool = False
    tie_embeddings: bool = True
    logit_softcap: float | None = None
    zero_init_proj: bool = False
    optimizer: typing.Literal["adamw", "muon"] = "adamw"
    muon_lr: float = 0.02  # peak LR of Muon's hidden matrices (learning_rate drives the AdamW groups)
    muon_momentum: float = 0.95
    embed_lr: float | None = None  # muon only: AdamW LR of the embeddings (None: learning_rate)
    head_lr: float | None = None  # muon only: AdamW LR of the output head (None: learning_rate)
    lr_schedule: typing.Literal["cosine", "wsd"] = "cosine"  # wsd: warm-up, stable, linear decay
    cooldown_frac: float = 0.4  # wsd: the share of max_iters spent decaying to min_lr

    def __post_init__(self) -> None:
        positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                    "block_size", "n_layer", "n_head", "n_embd")
        for name in positive:
            if getattr(self, name) < 1:
                raise GptforgeError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "keep_last", "seed"):
            if getattr(self, name) < 0:
                raise GptforgeError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise GptforgeError(f"--dtype={self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise GptforgeError(f"--backend={self.backend!r} is not one of auto, nccl, gloo")
        if not 0.0 <= self.dropout < 1.0:
            raise GptforgeError(f"--dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise GptforgeError(f"--cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        if self.logit_softcap is not None and self.logit_softcap <= 0:
            raise GptforgeError(f"--logit_softcap must be positive or None, got {self.logit_softcap}")


def resolve_device(device: str) -> str:
    """'auto' becomes what this machine has: cuda, else mps, else cpu."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_compile(compile: bool | None, device: str) -> bool:
    """None becomes True on CUDA, where compiled kernels pay; eager elsewhere."""
    return device.startswith("cuda") if compile is None else compile


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' follows the device: bf16 on CUDA where supported, else fp16 (with a GradScaler); fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def read_toml(path: Path, valid: typing.Collection[str] | None = None) -> dict[str, Any]:
    """A TOML config file's keys; tables are flattened (`[model] n_layer = 4` gives `n_layer`), so a file may
    group its keys as it likes. With `valid`, a key outside it is an error naming its table and the closest key,
    because once flattened the table would be lost from the message."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise GptforgeError(f"{path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        table, items = (key, value) if isinstance(value, dict) else ("", {key: value})
        for name, item in items.items():
            in_table = f" (in table [{table}])" if table else ""
            if isinstance(item, dict):
                raise GptforgeError(f"{path}: table [{table}.{name}] is nested too deep; tables hold keys only")
            if valid is not None and name not in valid:
                raise GptforgeError(f"unknown option --{name}{in_table} in {path}{closest_key(name, valid)}")
            if name in flat:
                raise GptforgeError(f"{path}: {name}{in_table} is set twice")
            flat[name] = item
    return flat


def read_nanogpt_config(path: Path) -> dict[str, Any]:
    """The literal assignments of a nanoGPT `config/*.py` file, read with `ast`, never executed.

    `x = 5 * 8` and other arithmetic on literals is evaluated; imports are skipped; any other assignment
    (`wandb_run_name = 'ft-' + str(time.time())`) is skipped with a warning.
    """
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as e:
        raise GptforgeError(f"{path} is not valid Python: {e.msg} at line {e.lineno}") from None
    values = {}
    for node in tree.body:
        if isinstance(node, ast.Import | ast.ImportFrom) or (
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)  # docstrings, comments as strings
        ):
            continue
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            warnings.warn(f"{path}:{node.lineno}: skipped a statement that is not a plain assignment", stacklevel=2)
            continue
        try:
            values[node.targets[0].id] = _literal_arithmetic(node.value)
        except (ValueError, TypeError, ArithmeticError):  # not a literal, unhashable, 1 / 0, overflow
            warnings.warn(
                f"{path}:{node.lineno}: skipped {node.targets[0].id} = {ast.unparse(node.value)} (not a literal)",
                stacklevel=2,
            )
    return values


_OPERATORS = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow, ast.Mod: operator.mod,
}


def _literal_arithmetic(node: ast.expr) -> Any:
    """The value of a literal, or of +-*/ // ** % on literal numbers; ValueError for anything else."""
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _literal_arithmetic(node.left), _literal_arithmetic(node.right)
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (left, right)):
            raise ValueError("arithmetic on non-numbers")
        if isinstance(node.op, ast.Pow) and abs(right) > 64:
            raise ValueError("exponent too large")  # 10 ** 10 ** 10 would hang instead of failing
        return _OPERATORS[type(node.op)](left, right)
    return ast.literal_eval(node)


def load_train_config(files: list[str], overrides: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
    """TrainConfig from `base` (default: the defaults), then each config file in order (TOML or nanoGPT .py),
    then the overrides."""
    cfg = base or TrainConfig()
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise GptforgeError(f"config file {path} does not exist (shipped configs are in configs/)")
        if path.suffix == ".toml":
            values = read_toml(path, valid={f.name for f in dataclasses.fields(TrainConfig)})
        elif path.suffix == ".py":
            values = read_nanogpt_config(path)
        else:
            raise GptforgeError(f"config file {path} must be .toml or a nanoGPT .py config")
        cfg = apply_overrides(cfg, values, source=str(path))
    return apply_overrides(cfg, overrides)
