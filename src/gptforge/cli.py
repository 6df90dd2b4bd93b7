"""The `gptforge` command: argument wiring only; each subcommand's work lives in its own module."""

import os
import sys
from collections.abc import Callable

from gptforge.errors import GptforgeError

USAGE = """usage: gptforge COMMAND [ARGS] [--key=value ...]

commands:
{commands}

Run `gptforge COMMAND --help` for a command's options."""


def _commands() -> dict[str, tuple[str, Callable[[list[str]], int | None]]]:
    """Subcommands: name -> (one-line help, entry point taking the remaining argv)."""
    return {}


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
