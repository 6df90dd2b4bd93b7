"""Tests for gptforge.options: `--key=value` parsing and coercion to dataclass field types, the one-line
errors for what a user gets wrong, and `--help`: every option of every command has its description.

    .venv/bin/python -m pytest tests/test_options.py
"""

from dataclasses import dataclass

import pytest

from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.options import apply_overrides, split_args


@dataclass
class Options:
    max_iters: int = 100
    learning_rate: float = 6e-4
    compile: bool = True
    device: str = "cpu"
    top_k: int | None = 200
    init_from: str | None = None
    betas: tuple[float, float] = (0.9, 0.95)


def test_split_args():
    positional, options = split_args(["configs/a.toml", "--max_iters=5", "--learning-rate=1e-3", "b.py"])
    assert positional == ["configs/a.toml", "b.py"]
    assert options == {"max_iters": "5", "learning_rate": "1e-3"}
    assert split_args(["--compile"]) == ([], {"compile": "True"})  # a bare flag is True
    assert apply_overrides(Options(), split_args(["--compile"])[1]).compile is True
    with pytest.raises(GptforgeError, match="--key=value"):
        split_args(["--=3"])
    with pytest.raises(GptforgeError, match="--max_iters=True is not an integer"):
        apply_overrides(Options(), split_args(["--max_iters"])[1])


def test_values_are_coerced_to_field_types():
    opts = apply_overrides(Options(), {"max_iters": "1e4", "learning_rate": "1", "compile": "False",
                                       "device": "cuda:1", "top_k": "None", "init_from": "gpt2",
                                       "betas": "(0.8, 0.99)"})
    assert opts == Options(max_iters=10000, learning_rate=1.0, compile=False, device="cuda:1", top_k=None,
                           init_from="gpt2", betas=(0.8, 0.99))
    assert isinstance(opts.max_iters, int) and isinstance(opts.learning_rate, float)
    assert apply_overrides(Options(), {"device": "'mps'", "top_k": "5"}) == Options(device="mps", top_k=5)
    assert apply_overrides(Options(), {"max_iters": 7}).max_iters == 7  # already-parsed values pass through
    # None only for optional fields.
    assert apply_overrides(Options(), {"top_k": "None", "init_from": "None"}) == Options(
        top_k=None, init_from=None
    )


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_iters", "2.5", "--max_iters=2.5 is not an integer"),
        ("max_iters", "True", "is not an integer"),
        ("compile", "yes", "is not a bool"),
        ("learning_rate", "fast", "is not a number"),
        ("betas", "0.9", "is not a list"),
        ("max_itres", "5", r"unknown option --max_itres \(did you mean --max_iters\?\)"),
    ],
)
def test_bad_values_are_one_line_errors(key, value, message):
    with pytest.raises(GptforgeError, match=message):
        apply_overrides(Options(), {key: value})


@pytest.mark.parametrize("command", ["train", "sample", "eval", "export", "bench", "plot", "serve",
                                     "prepare shakespeare_char", "prepare text", "prepare openwebtext"])
def test_every_option_of_every_command_has_a_description(capsys, command):
    assert main([*command.split(), "--help"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  --")]
    assert rows
    undescribed = [row.split()[0] for row in rows if len(row.split(maxsplit=1)) < 2]
    assert not undescribed, f"gptforge {command} --help: no description for {undescribed}"
