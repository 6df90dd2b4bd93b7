"""`gptforge export`: a run's weights, without optimizer or training state, in a format other tools load.

- `hf`: a Hugging Face GPT-2 directory (`config.json`, `generation_config.json`, `model.safetensors`) that
  `transformers.GPT2LMHeadModel.from_pretrained` loads as the same function, and the run's tokenizer as
  `AutoTokenizer` loads it (`tokenizer.json`, `tokenizer_config.json`; hf.py does both conversions).
- `safetensors`: gptforge's own state dict (nn.Linear layout, the tied head stored once) as
  `model.safetensors` plus `config.json` holding the `GPTConfig`, read back by `load_export`.

Both also write `gptforge_tokenizer.json` (and a trained BPE's `tokenizer.json`), so that `gptforge sample
--init_from=DIR` decodes an exported char or BPE model with its own vocabulary instead of GPT-2's.
`onnx`, `gguf` and `nanogpt` are written by onnx_export.py, gguf_export.py and nanogpt_export.py.
This module reads a run (runs.py) and writes files; how a format maps the model is its own or hf.py's.
"""

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from safetensors.torch import save_file

from gptforge import __version__
from gptforge.atomic import atomic_path, atomic_write_text, check_writable
from gptforge.chat_template import ChatTemplate, ChatTokenizer
from gptforge.checkpoint import check_shapes, read_json, read_safetensors
from gptforge.errors import GptforgeError
from gptforge.gguf_export import GgufType, write_gguf
from gptforge.hf import save_hf_gpt2, save_hf_tokenizer
from gptforge.mirror import mirror_dir
from gptforge.model import GPT, GPTConfig
from gptforge.nanogpt_export import write_nanogpt
from gptforge.onnx_export import write_onnx
from gptforge.runs import Run, load_run
from gptforge.tokenizer import BPETokenizer, Tokenizer, from_spec

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "gptforge_tokenizer.json"
BPE_FILE = "gptforge_bpe.json"
FORMAT = "gptforge"  # config.json's "format" in a safetensors export; HF's config.json has none
# when tied, the same tensor as transformer.wte.weight; safetensors stores no aliases
TIED_HEAD = "lm_head.weight"


@dataclass
class ExportOptions:
    out_dir: str = field(
        default="out", metadata={"help": "the run directory (or a checkpoint file) to export"}
    )
    format: Literal["hf", "safetensors", "onnx", "gguf", "nanogpt"] = field(
        default="hf",
        metadata={"help": "hf: a transformers GPT-2 directory; safetensors: gptforge's state dict; "
                          "onnx: a decoder graph with past/present keys and values for onnxruntime; "
                          "gguf: one llama.cpp file (--to=FILE.gguf); "
                          "nanogpt: a ckpt.pt (and a char run's meta.pkl) for nanoGPT's sample.py"},
    )
    to: str = field(default="", metadata={"help": "output directory (required; a file for gguf)"})
    gguf_type: GgufType = field(
        default="f32", metadata={"help": "gguf's matrices: f32, f16, or q8_0 (8-bit, blocks of 32)"}
    )
    which: Literal["best", "latest"] = field(default="best", metadata={"help": "which checkpoint of the run"})
    data_dir: str | None = field(
        default=None, metadata={"help": "where the run's dataset lives, if not where it was trained"}
    )
    mirror: str | None = field(
        default=None,
        metadata={"help": "local mirror of the tokenizer files (default: $GPTFORGE_DATA_MIRROR)"},
    )


def export(opts: ExportOptions) -> Path:
    """Write the run's model and tokenizer to `opts.to`; returns that directory."""
    if not opts.to:
        raise GptforgeError("name the output directory: --to=DIR")
    to = Path(opts.to)
    check_writable(to, "--to", directory=opts.format != "gguf")
    run = load_run(opts.out_dir, opts.which, opts.data_dir, mirror_dir(opts.mirror))
    own_options = {"gguf_type": opts.gguf_type} if opts.format == "gguf" else {}
    WRITERS[opts.format](run, to, **own_options)
    return to


def write_hf(run: Run, to: Path) -> None:
    """A Hugging Face GPT-2 directory with the run's tokenizer (and chat template)."""
    end_of_turn = run.chat_template.end if run.chat_template is not None else None
    save_hf_gpt2(run.model, to, run.tokenizer.eot_token, end_of_turn)
    save_hf_tokenizer(run.tokenizer, to, run.model.config.block_size)
    save_tokenizer(run.tokenizer, to)


def write_safetensors(run: Run, to: Path) -> None:
    """gptforge's own state dict and config, with the run's tokenizer."""
    save_export(run.model, to)
    save_tokenizer(run.tokenizer, to)


# One writer per --format: (run, destination) -> files.
WRITERS: dict[str, Callable[[Run, Path], None]] = {
    "hf": write_hf,
    "safetensors": write_safetensors,
    "onnx": write_onnx,
    "gguf": write_gguf,
    "nanogpt": write_nanogpt,
}


def save_export(model: GPT, directory: str | Path) -> None:
    """gptforge's state dict as `model.safetensors` and its `GPTConfig` as `config.json`, both atomically."""
    directory = Path(directory)
    tied = model.config.tie_embeddings
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
               if not (tied and k == TIED_HEAD)}
    with atomic_path(directory / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    config = {"format": FORMAT, "gptforge_version": __version__,
              "model_args": dataclasses.asdict(model.config)}
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def is_export(directory: str | Path) -> bool:
    """Whether `directory` holds a gptforge safetensors export (rather than, say, an HF GPT-2 directory)."""
    config = Path(directory) / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def load_export(directory: str | Path) -> GPT:
    """The model of a safetensors export (dropout off, on the CPU)."""
    directory = Path(directory)
    model_args = read_json(directory / CONFIG_FILE)["model_args"]
    model = GPT(GPTConfig.from_dict({**model_args, "dropout": 0.0}))
    tensors = read_safetensors(directory / WEIGHTS_FILE)
    check_shapes(model, tensors, f"{directory / CONFIG_FILE}'s model_args")
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if [k for k in missing if not (model.config.tie_embeddings and k == TIED_HEAD)] or unexpected:
        raise GptforgeError(f"{directory / WEIGHTS_FILE} does not match its {CONFIG_FILE}: missing "
                            f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    """The tokenizer's spec (a chat model's with its template) beside the weights, and a trained BPE's own
    file as `gptforge_bpe.json` (`tokenizer.json` is Hugging Face's, which a chat model's markers extend)."""
    directory = Path(directory)
    spec = tokenizer.spec()
    base = tokenizer.base if isinstance(tokenizer, ChatTokenizer) else tokenizer
    if isinstance(base, BPETokenizer):
        base.save(directory / BPE_FILE)
        spec = {**spec, "file": BPE_FILE}
    atomic_write_text(directory / TOKENIZER_FILE, json.dumps(spec, indent=2) + "\n")


def load_tokenizer(directory: str | Path, mirror: Path | None = None) -> Tokenizer | None:
    """The tokenizer an export carries, or None (a plain HF GPT-2 directory); `mirror` as for `from_spec`."""
    directory = Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    spec = read_json(path)
    tokenizer = from_spec(spec, directory, mirror)
    if spec.get("chat_template"):
        return ChatTokenizer(tokenizer, ChatTemplate.from_spec(spec["chat_template"]))
    return tokenizer
