"""Tests for gptforge.config: `--key=value` parsing and coercion to dataclass field types.

    .venv/bin/python -m pytest tests/test_config.py
"""

from dataclasses import dataclass

import pytest

from gptforge.config import apply_overrides, split_args
from gptforge.errors import GptforgeError


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
    with pytest.raises(GptforgeError, match="--key=value"):
        split_args(["--compile"])


def test_values_are_coerced_to_field_types():
    opts = apply_overrides(Options(), {"max_iters": "1e4", "learning_rate": "1", "compile": "False",
                                       "device": "cuda:1", "top_k": "None", "init_from": "gpt2",
                                       "betas": "(0.8, 0.99)"})
    assert opts == Options(max_iters=10000, learning_rate=1.0, compile=False, device="cuda:1", top_k=None,
                           init_from="gpt2", betas=(0.8, 0.99))
    assert isinstance(opts.max_iters, int) and isinstance(opts.learning_rate, float)
    assert apply_overrides(Options(), {"device": "'mps'", "top_k": "5"}) == Options(device="mps", top_k=5)
    assert apply_overrides(Options(), {"max_iters": 7}).max_iters == 7  # already-parsed values pass through


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
