"""Where a model comes from for the commands that use one (sample, eval, serve): `init_from` names a training
run (`resume`, with `out_dir`), a directory written by `gptforge export` or transformers, or an HF GPT-2
(`gpt2`, `gpt2-medium`, ...). Each comes with the tokenizer it was trained with. `SourceOptions` are those
commands' shared options: which model, the device and dtype it runs in, and its `--quantize`; `DraftOptions`
add the draft model of speculative decoding for the commands that decode.
"""

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gptforge import export
from gptforge.chat_template import ChatTemplate, ChatTokenizer
from gptforge.checkpoint import CHECKPOINT_NAME
from gptforge.device import check_dtype, resolve_device, resolve_dtype
from gptforge.errors import GptforgeError
from gptforge.mirror import mirror_dir
from gptforge.model import GPT
from gptforge.options import option
from gptforge.quantize import check_quantize
from gptforge.runs import dataset_dir, load_run
from gptforge.speculative import DRAFT_TOKENS
from gptforge.tokenizer import GPT2Tokenizer, Tokenizer


@dataclass
class Source:
    """A model (on the CPU, dropout off), its tokenizer, and the directory it was read from
    (None: a hub name)."""

    model: GPT
    tokenizer: Tokenizer
    directory: Path | None
    name: str  # how to call it in reports: the run or directory path, or the hub name
    dataset: Path | None = None  # a run's dataset directory
    iter_num: int | None = None  # a run's checkpoint iteration
    chat_template: ChatTemplate | None = None  # how to render a conversation, for a finetuned assistant


def load_source(
    init_from: str, out_dir: str = "out", which: Literal["best", "latest"] = "best",
    data_dir: str | None = None, mirror: Path | None = None,
) -> Source:
    """The model and tokenizer that `init_from` names; `mirror` holds tokenizer files (default: the env's)."""
    if init_from != "resume" and (Path(init_from) / CHECKPOINT_NAME).is_file():  # a run's directory, named
        init_from, out_dir = "resume", init_from
    if init_from == "resume":
        run = load_run(out_dir, which, data_dir, mirror)
        path = Path(out_dir)
        directory = path if path.is_dir() else path.parent
        dataset = dataset_dir(run.checkpoint, data_dir)
        return Source(run.model, run.tokenizer, directory, out_dir, dataset, run.checkpoint.get("iter_num"),
                      run.chat_template)
    if export.is_export(init_from):
        model = export.load_export(init_from)
    else:
        model = GPT.from_pretrained(init_from, override_args={"dropout": 0.0})
    directory = Path(init_from) if Path(init_from).is_dir() else None
    tokenizer = export.load_tokenizer(directory, mirror) if directory is not None else None
    template = tokenizer.template if isinstance(tokenizer, ChatTokenizer) else None
    return Source(model, tokenizer or GPT2Tokenizer(mirror), directory, init_from, chat_template=template)


@dataclass
class SourceOptions:
    """The options of every command that loads a model (sample, eval, serve):
    which one, where it runs, in what."""

    init_from: str = option("resume", "resume (the run in out_dir), gpt2*, or a model directory")
    out_dir: str = option("out", "the run to use (init_from=resume)")
    which: Literal["best", "latest"] = option("best", "the run's best or latest checkpoint")
    data_dir: str | None = option(None, "where the run's dataset (its tokenizer) lives, if it moved")
    device: str = option("auto", "cpu, cuda, cuda:1, mps; auto: the best there is")
    dtype: str = option("auto", "float32, bfloat16, float16; auto follows the device")
    quantize: str = option("none", "int8: int8 weight-only matmuls, ~2x faster CPU decoding (docs/model.md)")
    mirror: str | None = option(
        None, "local mirror tried before downloading (default: $GPTFORGE_DATA_MIRROR)"
    )

    def __post_init__(self) -> None:
        check_dtype(self.dtype)
        check_quantize(self.quantize)

    def load(self) -> Source:
        return load_source(self.init_from, self.out_dir, self.which, self.data_dir, mirror_dir(self.mirror))

    def placement(self) -> tuple[str, str]:
        """The device and dtype names the model runs on, "auto" resolved, checked against `--quantize`."""
        device = resolve_device(self.device)
        dtype = resolve_dtype(self.dtype, device)
        check_quantize(self.quantize, device, dtype)
        return device, dtype


@dataclass
class DraftOptions(SourceOptions):
    """The options of the commands that decode (sample, chat, serve): a draft model for speculative
    decoding (speculative.py)."""

    draft: str | None = option(
        None, "a smaller model with the same tokenizer that drafts tokens for this one to check "
        "(speculative decoding): a run directory, gpt2*, or a model directory"
    )
    draft_tokens: int | None = option(None, f"tokens the draft proposes per step (default {DRAFT_TOKENS})")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draft_tokens is not None and self.draft is None:
            raise GptforgeError(f"--draft_tokens={self.draft_tokens} needs a draft model: add --draft=RUN")
        if self.draft_tokens is not None and self.draft_tokens < 1:
            raise GptforgeError(f"--draft_tokens={self.draft_tokens} must be at least 1")
        if self.draft == "resume":
            raise GptforgeError("--draft=resume: name the draft's run directory, e.g. --draft=out-draft")

    def load_draft(self, target: Source) -> Source | None:
        """The draft model (None without --draft), checked against `target`: the same tokenizer, one line
        otherwise; a draft as large as the model or larger is allowed (the output is the same) with a
        warning, since it makes decoding slower."""
        if self.draft is None:
            return None
        draft = load_source(self.draft, mirror=mirror_dir(self.mirror))
        if draft.tokenizer.spec() != target.tokenizer.spec():
            raise GptforgeError(
                f"--draft={self.draft} has another tokenizer ({describe(draft.tokenizer)}) than the model "
                f"{target.name} ({describe(target.tokenizer)}): a draft must share the model's tokenizer"
            )
        size, target_size = draft.model.get_num_params(), target.model.get_num_params()
        if size >= target_size:
            warnings.warn(f"--draft={self.draft} has {size:,} parameters, the model {target_size:,}: a draft "
                          "that is not smaller makes decoding slower, not faster", stacklevel=2)
        return draft


def describe(tokenizer: Tokenizer) -> str:
    """A tokenizer in a few words, for errors: its kind and size, and what sets it apart from others."""
    spec = tokenizer.spec()
    extra = ", a chat template" if "chat_template" in spec else ""
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    return f"{spec['kind']}, {tokenizer.vocab_size} tokens{extra}, spec {digest}"
