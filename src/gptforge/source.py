"""Where a model comes from for the commands that use one (sample, eval, serve): `init_from` names a training
run (`resume`, with `out_dir`), a directory written by `gptforge export` or transformers, or an HF GPT-2
(`gpt2`, `gpt2-medium`, ...). Each comes with the tokenizer it was trained with. `SourceOptions` are those
commands' shared options: which model, and the device and dtype it runs in.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from gptforge import export
from gptforge.chat_template import ChatTemplate, ChatTokenizer
from gptforge.checkpoint import CHECKPOINT_NAME
from gptforge.device import check_dtype, resolve_device, resolve_dtype
from gptforge.mirror import mirror_dir
from gptforge.model import GPT
from gptforge.options import option
from gptforge.runs import dataset_dir, load_run
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
    mirror: str | None = option(
        None, "local mirror tried before downloading (default: $GPTFORGE_DATA_MIRROR)"
    )

    def __post_init__(self) -> None:
        check_dtype(self.dtype)

    def load(self) -> Source:
        return load_source(self.init_from, self.out_dir, self.which, self.data_dir, mirror_dir(self.mirror))

    def placement(self) -> tuple[str, str]:
        """The device and dtype names the model runs on, "auto" resolved."""
        device = resolve_device(self.device)
        return device, resolve_dtype(self.dtype, device)
