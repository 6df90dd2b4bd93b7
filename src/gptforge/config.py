"""Training configuration: `TrainConfig` and the config files that set it (TOML, or nanoGPT's Python files
read as data, never executed), applied in order before the command line's `--key=value` options (options.py).

The model keys are GPTConfig's own (model.py): declared here with its types, checked by its rules, turned into
a model by `TrainConfig.model_config`. This module knows options and files, nothing of training itself.
"""

import ast
import dataclasses
import operator
import tomllib
import typing
import warnings
from pathlib import Path
from typing import Any

from gptforge.device import check_dtype
from gptforge.errors import GptforgeError
from gptforge.model import MODEL_KEYS, GeluApproximate, GPTConfig, Mlp, Norm, PosEmb
from gptforge.options import apply_overrides, closest_key, option

# torch.compile's modes; "max-autotune-no-cudagraphs" also tunes the matmuls (Inductor's C++ GEMM templates on
# CPU)
CompileMode = typing.Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclasses.dataclass
class TrainConfig:
    """Every key of nanoGPT's train.py, same names and defaults, plus gptforge's own (marked "gptforge")."""

    # I/O
    out_dir: str = option("out", "the run directory: checkpoints, config.json, metrics.jsonl")
    eval_interval: int = option(2000, "evaluate (and checkpoint) every this many iterations")
    log_interval: int = option(1, "print and log the training loss every this many iterations")
    eval_iters: int = option(200, "batches per split in each evaluation")
    eval_only: bool = option(False, "evaluate once and exit")
    always_save_checkpoint: bool = option(
        True, "also write the latest checkpoint when val loss did not improve"
    )
    init_from: str = option(
        "scratch", "scratch, resume (the run in out_dir), gpt2* or a local HF GPT-2 directory"
    )
    # wandb logging
    wandb_log: bool = option(False, "log to Weights & Biases (needs gptforge[wandb])")
    wandb_project: str = option("owt", "the wandb project")
    wandb_run_name: str = option("gpt2", "the wandb run name")
    # data
    dataset: str = option("openwebtext", "the prepared dataset: DATA_DIR/DATASET")
    data_dir: str = option("data", "gptforge: where prepared datasets live")
    data_mix: str = option(
        "", "gptforge: NAME:WEIGHT,... a weighted mixture of datasets (or paths), in place of --dataset"
    )
    align_rows: typing.Literal["none", "bos"] = option(
        "none", "gptforge: bos: every row starts at the end-of-text token that opens a document"
    )
    gradient_accumulation_steps: int = option(
        5 * 8, "micro-steps per optimizer step, over all processes together"
    )
    batch_size: int = option(12, "micro-batch size: rows per micro-step per process")
    block_size: int = option(1024, "context length: tokens per row")
    # model
    n_layer: int = option(12, "transformer blocks")
    n_head: int = option(12, "attention heads per block")
    n_embd: int = option(768, "embedding width")
    dropout: float = option(0.0, "dropout rate; for pretraining 0 is good, for finetuning try 0.1+")
    bias: bool = option(False, "biases in LayerNorm and Linear layers")
    # AdamW
    learning_rate: float = option(6e-4, "peak learning rate")
    max_iters: int = option(600000, "total optimizer steps")
    weight_decay: float = option(1e-1, "AdamW weight decay of the matmul and embedding weights")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    grad_clip: float = option(1.0, "clip gradients at this norm; 0.0 disables")
    # learning rate decay
    decay_lr: bool = option(True, "follow the schedule (warm-up and decay); False: a constant learning_rate")
    warmup_iters: int = option(2000, "iterations of linear warm-up")
    lr_decay_iters: int = option(600000, "cosine: iterations to decay over (~= max_iters per Chinchilla)")
    min_lr: float = option(6e-5, "the learning rate at the end of the decay (~= learning_rate / 10)")
    # system
    backend: str = option("auto", "torch.distributed backend: nccl, gloo; auto picks by device")
    device: str = option("auto", "cpu, cuda, cuda:1, mps; auto: cuda, else mps, else cpu")
    dtype: str = option(
        "auto", "float32, bfloat16, float16; auto: bf16 on CUDA if supported, else fp16; fp32 on CPU"
    )
    compile: bool | None = option(None, "torch.compile the model (None: on CUDA only; slower on a CPU)")
    compile_mode: CompileMode = option("default", "torch.compile's mode")
    activation_checkpointing: bool = option(
        False, "gptforge: recompute each block's activations in backward: less memory, ~1/3 more compute"
    )
    peak_tflops: float | None = option(
        None, "gptforge: the device's peak TFLOPS for MFU (None: looked up by GPU name, measured on a CPU)"
    )
    # gptforge
    seed: int = option(1337, "gptforge: seeds the initial weights, the batches and dropout")
    keep_last: int = option(0, "gptforge: older checkpoints kept besides the latest and the best")
    parallelism: typing.Literal["ddp", "fsdp"] = option("ddp", "gptforge: under torchrun, DDP or FSDP2")
    # gptforge: modern architecture (model.GPTConfig; the defaults are GPT-2) and optimizer, see
    # docs/speedrun.md
    pos_emb: PosEmb = option("learned", "gptforge: positions: learned embeddings (GPT-2) or rope")
    norm: Norm = option("layernorm", "gptforge: layernorm (GPT-2) or rmsnorm")
    mlp: Mlp = option("gelu", "gptforge: the feed-forward: gelu (GPT-2), relu2 or swiglu")
    gelu_approximate: GeluApproximate = option(
        "tanh", "gptforge: GPT-2's tanh GELU; none: nanoGPT's exact erf"
    )
    qk_norm: bool = option(False, "gptforge: RMS-normalise queries and keys before attention")
    tie_embeddings: bool = option(True, "gptforge: the output head is the token embedding")
    logit_softcap: float | None = option(None, "gptforge: logits become cap * tanh(logits / cap)")
    zero_init_proj: bool = option(False, "gptforge: residual projections start at zero")
    optimizer: typing.Literal["adamw", "muon"] = option(
        "adamw", "gptforge: adamw, or muon for the hidden matrices"
    )
    muon_lr: float = option(
        0.02, "gptforge: peak LR of Muon's hidden matrices (learning_rate drives AdamW's)"
    )
    muon_momentum: float = option(0.95, "gptforge: Muon's momentum")
    embed_lr: float | None = option(
        None, "gptforge: muon only: AdamW LR of the embeddings (None: learning_rate)"
    )
    head_lr: float | None = option(
        None, "gptforge: muon only: AdamW LR of the output head (None: learning_rate)"
    )
    lr_schedule: typing.Literal["cosine", "wsd"] = option(
        "cosine", "gptforge: cosine, or wsd (warm-up, stable, linear decay)"
    )
    cooldown_frac: float = option(0.4, "gptforge: wsd: the share of max_iters spent decaying to min_lr")

    def __post_init__(self) -> None:
        positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps",
                    "batch_size", "block_size", "n_layer", "n_head", "n_embd")
        for name in positive:
            if getattr(self, name) < 1:
                raise GptforgeError(f"--{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_iters", "warmup_iters", "lr_decay_iters", "keep_last", "seed"):
            if getattr(self, name) < 0:
                raise GptforgeError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0 or self.min_lr < 0:
            raise GptforgeError(f"--learning_rate must be positive and --min_lr >= 0, got "
                                f"{self.learning_rate} and {self.min_lr} "
                                "(the schedule is a fraction of the peak)")
        check_dtype(self.dtype)
        if self.backend not in ("auto", "nccl", "gloo"):
            raise GptforgeError(f"--backend={self.backend!r} is not one of auto, nccl, gloo")
        if not 0.0 <= self.cooldown_frac <= 1.0:
            raise GptforgeError(f"--cooldown_frac must be in [0, 1], got {self.cooldown_frac}")
        self.model_config(vocab_size=1)  # the model keys, checked by the model's own rules

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The model these options describe, for a vocabulary of `vocab_size` tokens."""
        try:
            return GPTConfig(**{k: getattr(self, k) for k in MODEL_KEYS}, vocab_size=vocab_size,
                             dropout=self.dropout)
        except ValueError as e:  # GPTConfig names its field: say it as the option
            raise GptforgeError(str(e).replace("GPTConfig.", "--")) from None


def _check_model_keys() -> None:
    """TrainConfig declares every model key with GPTConfig's type: a key added to one but not the other fails
    here, at import, instead of being ignored by training."""
    ours, model = typing.get_type_hints(TrainConfig), typing.get_type_hints(GPTConfig)
    wrong = [k for k in (*MODEL_KEYS, "dropout") if ours.get(k) != model[k]]
    if wrong:
        raise TypeError(f"TrainConfig must declare GPTConfig's {', '.join(wrong)} with the same types")


_check_model_keys()


def read_toml(path: Path, valid: typing.Collection[str] | None = None) -> dict[str, Any]:
    """A TOML config file's keys; tables are flattened (`[model] n_layer = 4` gives `n_layer`), so a file may
    group its keys as it likes. With `valid`, a key outside it is an error naming its table and the closest
    key, because once flattened the table would be lost from the message."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise GptforgeError(f"{path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key == "data_mix" and isinstance(value, dict):  # [data_mix] fineweb = 0.7: the option's value
            value = ",".join(f"{name}:{weight}" for name, weight in value.items())
        table, items = (key, value) if isinstance(value, dict) else ("", {key: value})
        for name, item in items.items():
            in_table = f" (in table [{table}])" if table else ""
            if isinstance(item, dict):
                raise GptforgeError(
                    f"{path}: table [{table}.{name}] is nested too deep; tables hold keys only"
                )
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
            # docstrings, comments as strings
            isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        ):
            continue
        if not (
            isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
        ):
            warnings.warn(f"{path}:{node.lineno}: skipped a statement that is not a plain assignment",
                          stacklevel=2)
            continue
        try:
            values[node.targets[0].id] = _literal_arithmetic(node.value)
        except (ValueError, TypeError, ArithmeticError):  # not a literal, unhashable, 1 / 0, overflow
            warnings.warn(
                f"{path}:{node.lineno}: skipped {node.targets[0].id} = {ast.unparse(node.value)} "
                "(not a literal)",
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


def load_train_config(
    files: list[str], overrides: dict[str, Any], base: TrainConfig | None = None
) -> TrainConfig:
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
