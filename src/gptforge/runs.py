"""A training run's directory as its readers see it: the model of its best or latest checkpoint and the
tokenizer its dataset was made with.

Training writes run directories; sampling and export read them through here, so both agree on which
checkpoint a run means and how its token ids become text. Nothing here writes files.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from gptforge.chat_template import ChatTemplate, ChatTokenizer
from gptforge.checkpoint import CHECKPOINT_NAME, checkpoint_file, load_checkpoint, model_from_checkpoint
from gptforge.data import META_FILE, Meta
from gptforge.errors import GptforgeError
from gptforge.lora import apply_lora, base_fingerprint, load_lora_state_dict, merge_lora
from gptforge.model import GPT
from gptforge.tokenizer import GPT2Tokenizer, Tokenizer, from_spec


@dataclass
class Run:
    """One checkpoint of a run, ready to use: the model (dropout off, on the CPU) and its tokenizer."""

    model: GPT
    tokenizer: Tokenizer
    checkpoint: dict[str, Any]  # the rest of the checkpoint: config, iter_num, tokenizer spec...
    chat_template: ChatTemplate | None = None  # a finetuned assistant's template


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
    if "lora" in ckpt:
        model = merge_lora(adapted_model(ckpt, mirror))
        model.config.dropout = 0.0
    else:
        model = model_from_checkpoint(ckpt, checkpoint_file(path, which), override_args={"dropout": 0.0})
    tokenizer = run_tokenizer(ckpt, model.config.vocab_size, data_dir, mirror)
    if not ckpt.get("chat_template"):
        return Run(model, tokenizer, ckpt)
    template = ChatTemplate.from_spec(ckpt["chat_template"])
    return Run(model, ChatTokenizer(tokenizer, template), ckpt, template)


def adapted_model(ckpt: dict[str, Any], mirror: Path | None = None) -> GPT:
    """A LoRA run's model, adapters not merged: its base (named in the checkpoint, its fingerprint checked),
    the rows the chat template grew, and the adapters."""
    from gptforge.source import load_source  # a base is itself a source (a run, an export, HF GPT-2)

    sft = ckpt["sft"]
    base = load_source(sft["base"], mirror=mirror).model
    if base_fingerprint(base.state_dict()) != sft["base_sha256"]:
        raise GptforgeError(f"the base {sft['base']} is not the model this LoRA run adapted (its weights "
                            "changed); restore that base, or finetune anew")
    if sft.get("grown_rows") is not None:
        base.resize_vocab(base.config.vocab_size + len(sft["grown_rows"]), rows=sft["grown_rows"])
    block_size = (ckpt.get("config") or {}).get("block_size", base.config.block_size)
    if block_size < base.config.block_size:  # the context the adapters were trained at, as full SFT keeps it
        base.crop_block_size(block_size)
    lora = ckpt["lora"]
    apply_lora(base, lora["rank"], lora["alpha"], lora["targets"], lora["dropout"])
    load_lora_state_dict(base, {k: v for k, v in ckpt["model"].items() if ".lora_" in k})
    return base


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
