"""The `gptforge` command: argument wiring only; each subcommand's work lives in its own module, imported when
that subcommand runs (so `gptforge --help` loads no torch model code). This is the one place where errors
become a line on stderr and exit status 2."""

import os
import sys
import warnings
from collections.abc import Callable
from typing import TypeVar

from gptforge.errors import GptforgeError, explain
from gptforge.options import apply_overrides, split_args, usage

T = TypeVar("T")

# The options that shrink what each command holds in memory, for its out-of-memory message.
MEMORY_KNOBS = {
    "train": "a lower --batch_size (with a higher --gradient_accumulation_steps the step's batch stays), "
             "--block_size, or a smaller model (--n_layer, --n_embd); on a GPU also --dtype=bfloat16",
    "sample": "a smaller --num_samples or model, or --dtype=bfloat16",
    "chat": "a smaller model, or --dtype=bfloat16",
    "eval": "a lower --batch_size, or --dtype=bfloat16",
    "serve": "a lower --max_batch (KV cache slots), or --dtype=bfloat16",
    "prepare": "a lower --num_proc",
}
MEMORY_KNOBS["bench"] = MEMORY_KNOBS["train"]

USAGE = """usage: gptforge COMMAND [ARGS] [--key=value ...]

commands:
{commands}

Run `gptforge COMMAND --help` for a command's options."""


def _commands() -> dict[str, tuple[str, Callable[[list[str]], int | None]]]:
    """Subcommands: name -> (one-line help, entry point taking the remaining argv)."""
    return {
        "prepare": ("tokenize a dataset into DATA_DIR/NAME/{train,val}.bin + meta.json", _prepare),
        "train": ("train, finetune or resume a model (under torchrun: on many processes)", _train),
        "sft": ("finetune a model into an assistant on conversations, in full or with LoRA", _sft),
        "sample": ("generate text from a run, GPT-2 or a model directory, streamed to stdout", _sample),
        "chat": ("talk to a finetuned assistant in the terminal, or answer one --prompt", _chat),
        "eval": ("score a run or GPT-2: val loss/bpb, WikiText-2, LAMBADA, HellaSwag, chat", _eval),
        "export": ("write a run's weights as a Hugging Face GPT-2 directory or safetensors", _export),
        "bench": ("time the training step of a model shape: ms/iter, tokens/s, MFU", _bench),
        "plot": ("draw a run's loss curves from OUT_DIR/metrics.jsonl to a PNG", _plot),
        "serve": ("serve a model over HTTP: OpenAI completions, batched, and a web playground", _serve),
    }


def _parse(argv: list[str], head: str, defaults: T, positional: int = 0) -> tuple[list[str], T] | None:
    """The positional arguments and options of a command configured by a dataclass; None once --help
    printed."""
    if any(arg in ("-h", "--help") for arg in argv):
        print(usage(head, defaults))
        return None
    args, overrides = split_args(argv)
    if len(args) != positional:
        raise GptforgeError(f"expected {head.removeprefix('usage: ')} (see --help)")
    return args, apply_overrides(defaults, overrides)


def _prepare(argv: list[str]) -> None:
    from gptforge.data.prepare import get_dataset, prepare_usage

    if any(arg in ("-h", "--help") for arg in argv):
        names = [arg for arg in argv if not arg.startswith("-")]
        print(prepare_usage(names[0] if names else None))
        return
    positional, overrides = split_args(argv)
    if len(positional) != 1:
        raise GptforgeError(
            "name one dataset: gptforge prepare NAME [--key=value ...] (see gptforge prepare --help)"
        )
    dataset = get_dataset(positional[0])
    meta = dataset.run(apply_overrides(dataset.options(), overrides))
    counts = ", ".join(f"{split} {count:,}" for split, count in meta.tokens.items())
    print(f"{meta.dataset}: {counts} tokens "
          f"({meta.tokenizer['kind']}, vocab {meta.vocab_size:,}, {meta.dtype})")


CONFIG_FILES = (
    "CONFIG: TOML files (see configs/) or nanoGPT config/*.py files (read as data, never run), applied in\n"
    "order, then the --key=value options."
)
TRAIN_USAGE = f"""usage: gptforge train [CONFIG ...] [--key=value ...]

{CONFIG_FILES} --init_from=resume --out_dir=DIR continues a run from its own saved config.
Many processes: torchrun --standalone --nproc_per_node=N -m gptforge train CONFIG ..."""
BENCH_USAGE = f"""usage: gptforge bench [CONFIG ...] [--key=value ...]

{CONFIG_FILES} Every training option applies: the step timed is the one `gptforge train` runs."""


def _train(argv: list[str]) -> None:
    from gptforge.config import TrainConfig
    from gptforge.train import run_config, train

    if any(arg in ("-h", "--help") for arg in argv):
        print(usage(TRAIN_USAGE, TrainConfig()))
        return
    files, overrides = split_args(argv)
    train(run_config(files, overrides))


SFT_USAGE = (
    "usage: gptforge sft --init_from=RUN|gpt2*|HF_DIR --data=CONVERSATIONS.jsonl [CONFIG ...] "
    "[--key=value ...]\n\n" + CONFIG_FILES + " --init_from=resume --out_dir=DIR continues a finetuning run."
)


def _sft(argv: list[str]) -> None:
    from gptforge.sft import SFTConfig, sft
    from gptforge.train import run_config

    if any(arg in ("-h", "--help") for arg in argv):
        print(usage(SFT_USAGE, SFTConfig()))
        return
    files, overrides = split_args(argv)
    sft(run_config(files, overrides, defaults=SFTConfig()))


def _sample(argv: list[str]) -> None:
    from gptforge.sample import SampleOptions, sample

    if parsed := _parse(argv, "usage: gptforge sample [--key=value ...]", SampleOptions()):
        sample(parsed[1])


def _chat(argv: list[str]) -> None:
    from gptforge.chat import ChatOptions, chat

    head = ("usage: gptforge chat [--out_dir=RUN | --init_from=DIR] [--prompt=TEXT] [--system=TEXT] "
            "[--key=value ...]")
    if parsed := _parse(argv, head, ChatOptions()):
        chat(parsed[1])


def _eval(argv: list[str]) -> None:
    from gptforge.evaluate import EvalOptions, evaluate

    head = ("usage: gptforge eval --task=val|wikitext2|lambada|hellaswag|chat "
            "[--out_dir=RUN | --init_from=gpt2|DIR]")
    if parsed := _parse(argv, head, EvalOptions()):
        evaluate(parsed[1])


def _export(argv: list[str]) -> None:
    from gptforge.export import ExportOptions, export

    head = ("usage: gptforge export --out_dir=RUN --format=hf|safetensors|onnx|gguf --to=DIR "
            "[--which=best|latest]")
    if parsed := _parse(argv, head, ExportOptions()):
        opts = parsed[1]
        print(f"exported {opts.out_dir} ({opts.which}) as {opts.format} to {export(opts)}")


def _bench(argv: list[str]) -> None:
    from gptforge.bench import BenchOptions, bench
    from gptforge.config import load_train_config

    if any(arg in ("-h", "--help") for arg in argv):
        print(usage(BENCH_USAGE, BenchOptions()))
        return
    files, overrides = split_args(argv)
    bench(load_train_config(files, overrides, base=BenchOptions()))


def _plot(argv: list[str]) -> None:
    from gptforge.plot import PlotOptions, plot

    if parsed := _parse(argv, "usage: gptforge plot OUT_DIR [--to=FILE.png]", PlotOptions(), positional=1):
        (out_dir,), opts = parsed
        print(f"wrote {plot(out_dir, opts)}")


def _serve(argv: list[str]) -> None:
    try:
        from gptforge.serve.server import ServeOptions, serve
    except ModuleNotFoundError as e:
        if e.name not in ("fastapi", "uvicorn"):
            raise
        raise GptforgeError(
            f"serving needs {e.name}, which is not installed: pip install 'gptforge[serve]'"
        ) from None

    head = ("usage: gptforge serve [--out_dir=RUN | --init_from=gpt2*|DIR] "
            "[--host=127.0.0.1] [--port=8000] ...")
    if parsed := _parse(argv, head, ServeOptions()):
        serve(parsed[1])


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors print one line to stderr and exit 2 (GPTFORGE_DEBUG=1 shows
    tracebacks)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    listing = "\n".join(f"  {name:<10} {help_}" for name, (help_, _) in commands.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands=listing))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"gptforge: error: unknown command {name!r}; choose one of: {', '.join(commands)}",
              file=sys.stderr)
        return 2
    label = f"gptforge {name}"
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:  # under torchrun every process reports: say which
        label += f" (rank {os.environ.get('RANK', '?')})"
    warnings.formatwarning = lambda message, *_: f"{label}: warning: {message}\n"
    try:
        return commands[name][1](rest) or 0
    except (GptforgeError, ValueError) as e:
        if os.environ.get("GPTFORGE_DEBUG"):
            raise
        print(f"{label}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, MemoryError, RuntimeError) as e:  # torch.OutOfMemoryError is a RuntimeError
        message = explain(e, MEMORY_KNOBS.get(name, MEMORY_KNOBS["train"]))
        if message is None or os.environ.get("GPTFORGE_DEBUG"):
            raise
        print(f"{label}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{label}: interrupted", file=sys.stderr)
        return 130
