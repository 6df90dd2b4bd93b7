"""The `gptforge` command: argument wiring only; each subcommand's work lives in its own module."""

import os
import sys
from collections.abc import Callable

from gptforge.config import apply_overrides, split_args
from gptforge.errors import GptforgeError

USAGE = """usage: gptforge COMMAND [ARGS] [--key=value ...]

commands:
{commands}

Run `gptforge COMMAND --help` for a command's options."""


def _commands() -> dict[str, tuple[str, Callable[[list[str]], int | None]]]:
    """Subcommands: name -> (one-line help, entry point taking the remaining argv)."""
    return {
        "prepare": ("tokenize a dataset into DATA_DIR/NAME/{train,val}.bin + meta.json", _prepare),
        "train": ("train, finetune or resume a model (under torchrun: on many processes)", _train),
    }


def _prepare(argv: list[str]) -> None:
    from gptforge.datasets import get_dataset, usage

    if any(arg in ("-h", "--help") for arg in argv):
        names = [arg for arg in argv if not arg.startswith("-")]
        print(usage(names[0] if names else None))
        return
    positional, overrides = split_args(argv)
    if len(positional) != 1:
        raise GptforgeError("name one dataset: gptforge prepare NAME [--key=value ...] (see gptforge prepare --help)")
    dataset = get_dataset(positional[0])
    meta = dataset.prepare(apply_overrides(dataset.options(), overrides))
    counts = ", ".join(f"{split} {count:,}" for split, count in meta.tokens.items())
    print(f"{meta.dataset}: {counts} tokens ({meta.tokenizer['kind']}, vocab {meta.vocab_size:,}, {meta.dtype})")


TRAIN_USAGE = """usage: gptforge train [CONFIG ...] [--key=value ...]

CONFIG: TOML files (see configs/) or nanoGPT config/*.py files (read as data, never run), applied in order,
then the --key=value options. --init_from=resume --out_dir=DIR continues a run from its own saved config.
Many processes: torchrun --standalone --nproc_per_node=N -m gptforge train CONFIG ...

options (defaults):
{options}"""


def _train(argv: list[str]) -> None:
    import dataclasses

    from gptforge.config import TrainConfig
    from gptforge.train import run_config, train

    if any(arg in ("-h", "--help") for arg in argv):
        options = "\n".join(f"  --{f.name}={f.default!r}" for f in dataclasses.fields(TrainConfig))
        print(TRAIN_USAGE.format(options=options))
        return
    files, overrides = split_args(argv)
    train(run_config(files, overrides))


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; user errors print one line to stderr and exit 2 (GPTFORGE_DEBUG=1 shows tracebacks)."""
    argv = sys.argv[1:] if argv is None else argv
    commands = _commands()
    listing = "\n".join(f"  {name:<10} {help_}" for name, (help_, _) in commands.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(commands=listing))
        return 0
    name, rest = argv[0], argv[1:]
    if name not in commands:
        print(f"gptforge: error: unknown command {name!r}; choose one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        return commands[name][1](rest) or 0
    except (GptforgeError, ValueError) as e:
        if os.environ.get("GPTFORGE_DEBUG"):
            raise
        print(f"gptforge {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptforge {name}: interrupted", file=sys.stderr)
        return 130
