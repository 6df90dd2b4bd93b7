"""A training run's directory as its readers see it: the model of its best or latest checkpoint and the
tokenizer its dataset was made with.

Training writes run directories; sampling and export read them through here, so both agree on which
checkpoint a run means and how its token ids become text. Nothing here writes files.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gptforge.checkpoint import CHECKPOINT_NAME, checkpoint_file, load_checkpoint, model_from_checkpoint
from gptforge.data import META_FILE, Meta
from gptforge.errors import GptforgeError
from gptforge.model import GPT
from gptforge.tokenizer import GPT2Tokenizer, Tokenizer, from_spec


@dataclass
class Run:
    """One checkpoint of a run, ready to use: the model (dropout off, on the CPU) and its tokenizer."""

    model: GPT
    tokenizer: Tokenizer
    checkpoint: dict[str, Any]  # the rest of the checkpoint: config, iter_num, tokenizer spec...


def load_run(
    out_dir: str | Path, which: Literal["best", "latest"] = "best", data_dir: str | None = None,
    mirror: Path | None = None,
) -> Run:
    """The run in `out_dir` (or a checkpoint file); `data_dir` says where its dataset lives now if it moved,
    and `mirror` (default: $GPTFORGE_DATA_MIRROR) holds the tokenizer files it may need."""
    path = Path(out_dir)
    if not path.is_file() and not (path / CHECKPOINT_NAME).is_file():
        raise GptforgeError(
            f"--out_dir={out_dir} holds no run (no {CHECKPOINT_NAME}); train one with `gptforge train "
            f"--out_dir={out_dir} ...`, or start from GPT-2 with --init_from=gpt2"
        )
    ckpt = load_checkpoint(path, which=which)
    model = model_from_checkpoint(ckpt, checkpoint_file(path, which), override_args={"dropout": 0.0})
    return Run(model, run_tokenizer(ckpt, model.config.vocab_size, data_dir, mirror), ckpt)


def dataset_dir(ckpt: dict[str, Any], data_dir: str | None = None) -> Path | None:
    """Where the run's dataset lives: `data_dir` (or the run's own) / its dataset name; None if unnamed."""
    config = ckpt.get("config") or {}
    dataset = config.get("dataset")
    if not dataset:
        return None
    return Path(data_dir or config.get("data_dir") or "data") / dataset


def run_tokenizer(
    ckpt: dict[str, Any], vocab_size: int, data_dir: str | None = None, mirror: Path | None = None
) -> Tokenizer:
    """The tokenizer a checkpoint was trained with: the spec it carries, else its dataset's meta.json (or
    nanoGPT's meta.pkl), else GPT-2's for a GPT-2-sized vocabulary, as nanoGPT's sample.py assumes."""
    directory = dataset_dir(ckpt, data_dir)
    spec = ckpt.get("tokenizer")
    if spec:
        # a char or gpt2 spec is self-contained; a trained bpe's tokenizer.json lives with the dataset
        return from_spec(spec, directory or Path("."), mirror)
    if directory is not None and ((directory / META_FILE).is_file() or (directory / "meta.pkl").is_file()):
        return Meta.read(directory).load_tokenizer(directory, mirror)
    if vocab_size >= GPT2Tokenizer.vocab_size:
        return GPT2Tokenizer(mirror)
    where = f"{directory} has no {META_FILE}" if directory else "it names no dataset"
    raise GptforgeError(
        f"cannot tell which tokenizer this {vocab_size}-token model was trained with: its checkpoint carries "
        f"none and {where}; pass --data_dir=DIR, the directory holding its dataset"
    )
