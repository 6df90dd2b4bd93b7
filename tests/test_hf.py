"""Tests for gptforge.hf: HF GPT-2 checkpoints load with HF's exact logits, and exports load back in HF.

    .venv/bin/python -m pytest tests/test_hf.py
"""

import json

import pytest
import torch
from conftest import tiny_config
from safetensors.torch import load_file, save_file

from gptforge import GPT
from gptforge.errors import GptforgeError

transformers = pytest.importorskip("transformers")


def tiny_hf(**overrides) -> "transformers.GPT2LMHeadModel":
    torch.manual_seed(0)
    args = dict(n_layer=2, n_head=4, n_embd=64, vocab_size=300, n_positions=128)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**{**args, **overrides}))
    # HF inits biases and LayerNorms to constants; randomise them so the comparison checks every tensor
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def hf_dir(tmp_path):
    tiny_hf().save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def assert_same_as_hf(model: GPT, hf_model, vocab: int = 300) -> None:
    idx = torch.randint(0, vocab, (3, 128))
    with torch.no_grad():
        ref = hf_model(idx, labels=idx)
        logits, loss = model.eval()(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(logits, ref.logits[:, :-1], rtol=0, atol=1e-5)
    assert loss.item() == pytest.approx(ref.loss.item(), abs=1e-5)


def test_from_pretrained_matches_hf_logits_and_loss(hf_dir):
    model = GPT.from_pretrained(hf_dir)
    cfg = model.config
    assert (cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.bias) == (
        300, 128, 2, 4, 64, True
    )
    assert cfg.gelu_approximate == "tanh"
    assert_same_as_hf(model, transformers.GPT2LMHeadModel.from_pretrained(hf_dir))


def test_from_pretrained_reads_openai_style_keys_and_pytorch_bin(tmp_path):
    """The hub's gpt2 files name tensors without the `transformer.` prefix; old repos ship a .bin."""
    hf = tiny_hf()
    hf.config.save_pretrained(tmp_path / "bin")
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    state["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 128, 128))  # old causal-mask buffer
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    assert_same_as_hf(GPT.from_pretrained(tmp_path / "bin"), hf)


def test_to_hf_round_trip(hf_dir, tmp_path):
    model = GPT.from_pretrained(hf_dir)
    model.to_hf(tmp_path / "export")
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export")
    assert_same_as_hf(model, reloaded)
    assert_same_as_hf(GPT.from_pretrained(tmp_path / "export"), reloaded)


@pytest.mark.parametrize(
    "overrides", [dict(bias=False), dict(vocab_size=50304), dict(gelu_approximate="none")]
)
def test_every_training_shape_exports(tmp_path, overrides):
    torch.manual_seed(0)
    model = GPT(tiny_config(**overrides)).eval()
    model.to_hf(tmp_path / "export")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    assert hf.config.vocab_size == model.config.vocab_size
    idx = torch.randint(0, 97, (2, 64))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits[:, -1:], model(idx)[0], rtol=0, atol=1e-5)
    if not model.config.bias:
        assert (load_file(tmp_path / "export" / "model.safetensors")["transformer.h.0.attn.c_attn.bias"]
                .abs().sum() == 0)


def test_exported_config_names_gpt2(tmp_path):
    GPT(tiny_config(vocab_size=50304)).to_hf(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gpt2" and config["architectures"] == ["GPT2LMHeadModel"]
    assert config["activation_function"] == "gelu_new" and config["eos_token_id"] == 50256


def test_override_args_allow_only_dropout(hf_dir):
    assert GPT.from_pretrained(hf_dir, override_args={"dropout": 0.1}).config.dropout == 0.1
    with pytest.raises(GptforgeError, match="only dropout"):
        GPT.from_pretrained(hf_dir, override_args={"n_layer": 4})


def test_non_gpt2_checkpoints_are_refused(hf_dir):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "activation_function": "relu", "n_inner": 100}))
    with pytest.raises(GptforgeError, match=r"activation_function 'relu'.*n_inner 100"):
        GPT.from_pretrained(hf_dir)


def test_mismatched_weights_are_refused(hf_dir):
    weights = load_file(hf_dir / "model.safetensors")
    del weights["transformer.h.1.mlp.c_fc.weight"]
    save_file(weights, hf_dir / "model.safetensors")
    with pytest.raises(GptforgeError, match=r"missing \['transformer.h.1.mlp.c_fc.weight'\]"):
        GPT.from_pretrained(hf_dir)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(GptforgeError, match="gpt2, gpt2-medium, gpt2-large, gpt2-xl"):
        GPT.from_pretrained("gpt3")


def test_offline_without_a_local_copy_says_how_to_supply_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(GptforgeError, match="pass its directory instead of 'gpt2-medium'"):
        GPT.from_pretrained("gpt2-medium")
