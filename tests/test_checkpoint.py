"""Tests for gptforge.checkpoint: round trips, nanoGPT checkpoints, and refusing unsafe pickles.

    .venv/bin/python -m pytest tests/test_checkpoint.py
"""

import builtins
from dataclasses import asdict

import pytest
import torch
from conftest import tiny_config

from gptforge import GPT
from gptforge.checkpoint import load_checkpoint, save_model
from gptforge.errors import GptforgeError


def same_logits(a: GPT, b: GPT) -> bool:
    idx = torch.randint(0, a.config.vocab_size, (2, 16))
    with torch.no_grad():
        return torch.equal(a.eval()(idx, idx)[0], b.eval()(idx, idx)[0])


def test_round_trip_file_and_run_directory(tiny_model, tmp_path):
    save_model(tiny_model, tmp_path / "ckpt.pt", iter_num=7)
    for path in (tmp_path / "ckpt.pt", tmp_path):
        loaded = GPT.from_checkpoint(path)
        assert loaded.config == tiny_model.config
        assert same_logits(loaded, tiny_model)
    assert load_checkpoint(tmp_path)["iter_num"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left behind


def test_compiled_model_saves_without_orig_mod_prefix(tiny_model, tmp_path):
    compiled = torch.compile(tiny_model)  # compiles lazily: never called here
    save_model(compiled, tmp_path / "ckpt.pt")
    keys = load_checkpoint(tmp_path / "ckpt.pt")["model"].keys()
    assert keys and not [k for k in keys if "_orig_mod" in k]


def test_nanogpt_checkpoint_loads_with_exact_gelu(tmp_path):
    """nanoGPT's train.py saves the compiled model's keys, model_args without gelu_approximate, and more."""
    torch.manual_seed(0)
    reference = GPT(tiny_config(gelu_approximate="none", bias=False))
    model_args = {k: v for k, v in asdict(reference.config).items() if k != "gelu_approximate"}
    state = {f"_orig_mod.{k}": v for k, v in reference.state_dict().items()}
    optimizer = torch.optim.AdamW(reference.parameters())
    torch.save({"model": state, "optimizer": optimizer.state_dict(), "model_args": model_args,
                "iter_num": 5000, "best_val_loss": torch.tensor(1.47),
                "config": {"dataset": "shakespeare_char", "compile": True}},
               tmp_path / "ckpt.pt")
    loaded = GPT.from_checkpoint(tmp_path / "ckpt.pt")
    assert loaded.config.gelu_approximate == "none" and loaded.config.bias is False
    assert same_logits(loaded, reference)
    assert GPT.from_checkpoint(tmp_path, override_args={"dropout": 0.2}).config.dropout == 0.2


class Payload:
    """Unpickling this runs `exec`, which would create the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, tiny_model):
    marker = tmp_path / "pwned"
    torch.save({"model_args": asdict(tiny_model.config), "model": tiny_model.state_dict(),
                "x": Payload(marker)},
               tmp_path / "ckpt.pt")
    with pytest.raises(GptforgeError, match="is not a safe checkpoint"):
        GPT.from_checkpoint(tmp_path / "ckpt.pt")
    assert not marker.exists()


def test_missing_truncated_and_foreign_files_are_clear_errors(tmp_path, tiny_model):
    with pytest.raises(GptforgeError, match="no checkpoint at"):
        GPT.from_checkpoint(tmp_path)
    save_model(tiny_model, tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(GptforgeError, match="not a readable checkpoint"):
        GPT.from_checkpoint(tmp_path)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(GptforgeError, match="lacks 'model_args' and 'model'"):
        GPT.from_checkpoint(tmp_path / "other.pt")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, tiny_model, monkeypatch):
    save_model(tiny_model, tmp_path / "ckpt.pt", iter_num=1)

    def crash(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_model, tmp_path / "ckpt.pt", iter_num=2)
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / "ckpt.pt")["iter_num"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
