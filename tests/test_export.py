"""Tests for gptforge.export: a trained run exported to HF loads in transformers with the same logits, the
safetensors format reloads bit for bit, and either one samples with the run's own tokenizer.

    .venv/bin/python -m pytest tests/test_export.py
"""

import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny_run

from gptforge.checkpoint import load_model
from gptforge.cli import main
from gptforge.export import ExportOptions, export, is_export, load_export
from gptforge.options import apply_overrides
from gptforge.sample import SampleOptions, sample


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("export"))


def test_hf_export_loads_in_transformers_with_the_same_logits(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", f"--out_dir={run}", "--format=hf", f"--to={tmp_path / 'hf'}"]) == 0
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    model = load_model(run, which="best").eval()
    idx = torch.randint(0, model.config.vocab_size, (3, model.config.block_size))
    with torch.no_grad():
        ours, _ = model(idx, idx)  # with targets: logits at every position
        theirs = hf(idx).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert (hf.config.vocab_size == model.config.vocab_size
            and hf.config.n_positions == model.config.block_size)


def test_safetensors_export_reloads_every_tensor_exactly(run, tmp_path):
    export(ExportOptions(out_dir=str(run), format="safetensors", to=str(tmp_path / "st"), which="latest"))
    files = sorted(p.name for p in (tmp_path / "st").iterdir())
    assert files == ["config.json", "gptforge_tokenizer.json", "model.safetensors"]  # no temporary files left
    config = json.loads((tmp_path / "st" / "config.json").read_text())
    original = load_model(run, which="latest")
    assert config["format"] == "gptforge" and config["model_args"]["n_embd"] == original.config.n_embd
    stored = load_file(tmp_path / "st" / "model.safetensors")
    assert "lm_head.weight" not in stored  # tied to the token embedding: stored once
    assert is_export(tmp_path / "st") and not is_export(run)
    reloaded = load_export(tmp_path / "st").state_dict()
    expected = original.state_dict()
    assert reloaded.keys() == expected.keys()
    assert all(torch.equal(reloaded[k], expected[k]) for k in expected)


def test_an_untied_head_is_exported_and_required(tmp_path):
    from gptforge import GPT, GPTConfig
    from gptforge.checkpoint import save_model
    from gptforge.errors import GptforgeError
    from gptforge.export import save_export

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, tie_embeddings=False))
    torch.nn.init.normal_(model.lm_head.weight)  # zero at init: make it a tensor a lost head would show
    save_export(model, tmp_path / "st")
    assert "lm_head.weight" in load_file(tmp_path / "st" / "model.safetensors")
    assert torch.equal(load_export(tmp_path / "st").lm_head.weight, model.lm_head.weight)
    save_model(model, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    del state["model"]["lm_head.weight"]
    torch.save(state, tmp_path / "headless.pt")
    with pytest.raises(GptforgeError, match=r"missing \['lm_head\.weight'\]"):
        load_model(tmp_path / "headless.pt")


@pytest.mark.parametrize("fmt", ["hf", "safetensors"])
def test_an_export_samples_the_run_s_text(run, tmp_path, fmt):
    export(ExportOptions(out_dir=str(run), format=fmt, to=str(tmp_path / fmt)))
    common = {"num_samples": 2, "max_new_tokens": 30, "device": "cpu", "start": "Thy"}
    from_run = sample(apply_overrides(SampleOptions(), {**common, "out_dir": str(run)}), out=io.StringIO())
    from_export = sample(apply_overrides(SampleOptions(), {**common, "init_from": str(tmp_path / fmt)}),
                         out=io.StringIO())
    assert from_export == from_run  # same weights, same char vocabulary, same seed


@pytest.mark.parametrize(("args", "message"), [
    (["--format=hf"], "name the output directory: --to=DIR"),
    (["--format=tflite", "--to=x"], "--format='tflite' is not one of 'hf', 'safetensors'"),
    (["--which=first", "--to=x"], "--which='first' is not one of 'best', 'latest'"),
])
def test_bad_options_are_one_line_errors(run, capsys, args, message):
    assert main(["export", f"--out_dir={run}", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge export: error: ") and message in err and err.count("\n") == 1


def test_an_out_dir_without_a_run_is_a_one_line_error(tmp_path, capsys):
    assert main(["export", f"--out_dir={tmp_path}", f"--to={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert "holds no run" in err and err.count("\n") == 1
    assert not (tmp_path / "x").exists()


# -- the HF export's tokenizer: transformers itself reads it, and gets gptforge's ids --

TEXTS = ["ROMEO:\nBut soft, what light", "  two  spaces, tabs\tand\nnewlines\n\n", "Shall I compare thee"]


def hf_tokenizer_export(tokenizer, tmp_path, vocab_size: int):
    from gptforge import GPT, GPTConfig
    from gptforge.hf import save_hf_gpt2, save_hf_tokenizer

    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=vocab_size))
    save_hf_gpt2(model, tmp_path, tokenizer.eot_token)
    save_hf_tokenizer(tokenizer, tmp_path, 32)
    return tmp_path


def sonnet_bpe():
    from tiny_run import SONNET

    from gptforge.tokenizer import BPETokenizer

    return BPETokenizer.train([SONNET * 5], 300)


@pytest.mark.parametrize("kind", ["char", "gpt2", "bpe"])
def test_hf_export_tokenizer_gives_gptforge_s_ids_in_transformers(tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer

    tokenizer = {"char": lambda: CharTokenizer.from_text(TEXTS), "gpt2": GPT2Tokenizer,
                 "bpe": sonnet_bpe}[kind]()
    directory = hf_tokenizer_export(tokenizer, tmp_path, 50304 if kind == "gpt2" else tokenizer.vocab_size)
    hf = transformers.AutoTokenizer.from_pretrained(directory)
    for text in TEXTS:
        ids = hf(text)["input_ids"]
        assert ids == tokenizer.encode(text)
        assert hf.decode(ids) == text
    config = json.loads((directory / "config.json").read_text())
    assert config["bos_token_id"] == config["eos_token_id"] == tokenizer.eot_token  # None for char: no 50256
    assert hf.eos_token_id == tokenizer.eot_token


def test_pipeline_generates_from_an_exported_run(run, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert main(["export", f"--out_dir={run}", "--format=hf", f"--to={tmp_path / 'hf'}"]) == 0
    generator = transformers.pipeline("text-generation", str(tmp_path / "hf"), device="cpu")
    out = generator("Shall I", max_new_tokens=8, do_sample=False)[0]["generated_text"]
    assert out.startswith("Shall I") and len(out) == len("Shall I") + 8  # one character per token


def test_exported_files_follow_the_umask(run, tmp_path):
    old = os.umask(0o022)
    try:
        assert main(["export", f"--out_dir={run}", "--format=hf", f"--to={tmp_path / 'hf'}"]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert set(modes.values()) == {0o644}, modes


def test_export_takes_a_mirror_like_every_command_that_may_fetch(run, tmp_path):
    mirror = Path(__file__).resolve().parents[2] / "shared" / "data"
    assert main(["export", f"--out_dir={run}", "--format=safetensors", f"--to={tmp_path / 'st'}",
                 f"--mirror={mirror}"]) == 0
