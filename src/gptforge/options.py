"""Command-line options: nanoGPT-style `--key=value` arguments applied to dataclasses,
and `--help` drawn from them.

Values are parsed with `ast.literal_eval` (never executed) and coerced to the field's declared type, so
`--max_iters=1e4` gives the int 10000 and `--top_k=None` works for optional fields. Every command's options
are a dataclass whose fields carry a one-line `help` in their metadata; `usage` renders them all the same
way. This module knows dataclasses and strings, nothing of what the options mean.
"""

import ast
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from gptforge.errors import GptforgeError

T = TypeVar("T")


def split_args(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split `argv` into positional arguments and a `{key: raw value}` dict of `--key=value` options; a bare
    `--flag` is `--flag=True`. A bare `--key` followed by a word that names no file (`--batch_size 8`) is the
    habit of other tools' parsers: an error that shows the `--key=value` form."""
    positional, options = [], {}
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            positional.append(arg)
            continue
        key, sep, value = arg[2:].partition("=")
        if not key:
            raise GptforgeError(f"option {arg!r} is not of the form --key=value")
        following = argv[i + 1] if i + 1 < len(argv) else None
        if (
            not sep
            and following is not None
            and not following.startswith("-")
            and not Path(following).exists()
        ):
            raise GptforgeError(
                f"options take their value after '=': write {arg}={following}, not {arg} {following}"
            )
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

    `source` names the config file the overrides come from, for error messages. Without it they are
    command-line text, and strings are parsed as literals (`--max_iters=1e4`); a file's values already have
    their types, so `max_iters = "1e4"` in a file is a wrong type, not a number.
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


def usage(head: str, defaults: Any) -> str:
    """`head` (the usage line and any notes) and one `--key=default  help` row per field of `defaults`."""
    rows = [(f"--{f.name}={getattr(defaults, f.name)!r}", f.metadata.get("help", ""))
            for f in dataclasses.fields(defaults)]
    width = max(len(option) for option, _ in rows)
    return f"{head}\n\noptions (defaults):\n" + "\n".join(
        f"  {option:<{width}}  {help_}".rstrip() for option, help_ in rows
    )


def option(default: Any, help: str) -> Any:
    """A dataclass field with its `--help` line."""
    return dataclasses.field(default=default, metadata={"help": help})
