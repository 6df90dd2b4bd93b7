"""Tests for gptforge.onnx_export, proven by onnxruntime itself: an exported run's graph gives gptforge's
logits with and without a past, decodes step by step from an empty past to the same greedy continuation as
`generate`, batched; a GPT-2-BPE-sized model with every architecture option does the same; an option the
graph is not known to express, or a missing package, is one line naming it.

    .venv/bin/python -m pytest tests/test_onnx_export.py
"""

import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch
from mirror_data import MIRROR, needs_mirror, reference_gpt2
from tiny_run import tiny_run

from gptforge import GPT, GPTConfig
from gptforge import onnx_export as onnx_export_module
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.generate import generate
from gptforge.onnx_export import save_onnx, write_onnx
from gptforge.runs import Run, load_run
from gptforge.tokenizer import GPT2Tokenizer

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


class OnnxRuntimeDecoder:
    """An exported directory in onnxruntime (CPU), fed as a user would: from its config.json's names."""

    def __init__(self, directory: Path):
        self.config = json.loads((directory / "config.json").read_text())
        options = ort.SessionOptions()
        options.intra_op_num_threads = 2
        self.session = ort.InferenceSession(str(directory / self.config["file"]), options,
                                            providers=["CPUExecutionProvider"])
        args = self.config["model_args"]
        self.past_names = self.config["inputs"][1:]
        self.n_head, self.head_size = args["n_head"], args["n_embd"] // args["n_head"]

    def empty_past(self, batch: int) -> list[np.ndarray]:
        return [np.zeros((batch, self.n_head, 0, self.head_size), np.float32) for _ in self.past_names]

    def step(self, ids: torch.Tensor, past: list[np.ndarray]) -> tuple[torch.Tensor, list[np.ndarray]]:
        feed = {"input_ids": ids.numpy(), **dict(zip(self.past_names, past, strict=True))}
        logits, *present = self.session.run(self.config["outputs"], feed)
        return torch.from_numpy(logits), present

    def greedy(self, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
        """Prefill the prompt into an empty past, then one token per step, each fed its last present."""
        logits, past = self.step(prompt, self.empty_past(prompt.size(0)))
        tokens = [logits[:, -1].argmax(-1, keepdim=True)]
        for _ in range(new_tokens - 1):
            logits, past = self.step(tokens[-1], past)
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
        return torch.cat([prompt, *tokens], dim=1)


def all_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """gptforge's logits at every position, recomputed without a cache."""
    with torch.no_grad():
        return model.head(model.hidden_states(idx))


def check_logits(model: GPT, decoder: OnnxRuntimeDecoder, lengths: tuple[int, ...], batch: int = 2) -> None:
    """For each prompt length: the whole prompt from an empty past, then the same prompt as a prefill and
    a one-token step on its present, then a chunk of several tokens after a past: gptforge's logits."""
    torch.manual_seed(0)
    for T in lengths:
        idx = torch.randint(0, model.config.vocab_size, (batch, T))
        expected = all_logits(model, idx)
        logits, _ = decoder.step(idx, decoder.empty_past(batch))
        torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4)
        if T > 1:
            _, past = decoder.step(idx[:, :-1], decoder.empty_past(batch))
            logits, present = decoder.step(idx[:, -1:], past)
            torch.testing.assert_close(logits, expected[:, -1:], rtol=0, atol=1e-4)
            assert present[0].shape == (batch, decoder.n_head, T, decoder.head_size)
        if T > 3:
            _, past = decoder.step(idx[:, :2], decoder.empty_past(batch))
            logits, _ = decoder.step(idx[:, 2:], past)
            torch.testing.assert_close(logits, expected[:, 2:], rtol=0, atol=1e-4)


def spread_weights(model: GPT) -> GPT:
    """Random weights wide enough that logits are far apart: greedy picks no near-ties."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("onnx"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    to = tmp_path_factory.mktemp("onnx") / "onnx"
    assert main(["export", f"--out_dir={run}", "--format=onnx", f"--to={to}"]) == 0
    return to


def test_the_export_names_its_graph_and_carries_the_tokenizer(run, exported):
    files = sorted(p.name for p in exported.iterdir())
    assert files == ["config.json", "gptforge_tokenizer.json", "model.onnx", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]  # and no temporary files left
    decoder = OnnxRuntimeDecoder(exported)
    config = decoder.config
    assert config["format"] == "gptforge-onnx" and config["model_args"]["n_layer"] == 2
    inputs = {i.name: i for i in decoder.session.get_inputs()}
    outputs = {o.name: o for o in decoder.session.get_outputs()}
    assert list(inputs) == config["inputs"] and list(outputs) == config["outputs"]
    assert config["inputs"][:3] == ["input_ids", "past_key_values.0.key", "past_key_values.0.value"]
    assert inputs["input_ids"].shape == ["batch", "sequence"] and inputs["input_ids"].type == "tensor(int64)"
    assert inputs["past_key_values.1.value"].shape == ["batch", 2, "past_sequence", 16]
    assert outputs["logits"].shape == ["batch", "sequence", 40]
    assert outputs["present.1.key"].shape == ["batch", 2, "past_sequence + sequence", 16]
    text = "Shall I compare thee"
    ours = load_run(run).tokenizer.encode(text)
    assert tokenizers.Tokenizer.from_file(str(exported / "tokenizer.json")).encode(text).ids == ours


def test_a_trained_run_gives_gptforge_s_logits_with_and_without_the_past(run, exported):
    check_logits(load_run(run).model.eval(), OnnxRuntimeDecoder(exported), lengths=(1, 2, 7, 32))


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_decoding_through_onnxruntime_is_generate_s(run, exported, batch):
    trained = load_run(run)
    text = ["Shall I compare", "Rough winds do s"][:batch]
    prompt = torch.tensor([trained.tokenizer.encode(t)[:8] for t in text])
    expected = generate(trained.model.eval(), prompt, 20, temperature=0)
    assert torch.equal(OnnxRuntimeDecoder(exported).greedy(prompt, 20), expected)


@needs_mirror
def test_a_gpt2_bpe_sized_model_with_every_architecture_option(tmp_path, monkeypatch):
    """GPT-2's vocabulary and tokenizer, and every option beyond GPT-2 at once (the trained run is GPT-2's
    architecture): one export, as each costs seconds. Its weights go to model.onnx.data, as a model's over
    2 GB do, here with the limit lowered."""
    monkeypatch.setattr(onnx_export_module, "EMBEDDED_LIMIT", 1_000_000)
    config = GPTConfig(block_size=48, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, bias=False,
                       pos_emb="rope", norm="rmsnorm", mlp="swiglu", qk_norm=True, tie_embeddings=False,
                       logit_softcap=3.0)
    model = spread_weights(GPT(config))
    write_onnx(Run(model, GPT2Tokenizer(MIRROR), {}), tmp_path)
    graph, data = (tmp_path / "model.onnx").stat().st_size, (tmp_path / "model.onnx.data").stat().st_size
    assert graph < 1_000_000 < data
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    decoder = OnnxRuntimeDecoder(tmp_path)
    check_logits(model, decoder, lengths=(1, 9, 48))
    prompt = torch.tensor([reference_gpt2().encode(t)[:3] for t in ("Hello, world", "The cat sat on")])
    assert torch.equal(decoder.greedy(prompt, 20), generate(model, prompt, 20, temperature=0))
    fast = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert fast.encode("Hello, world").ids == reference_gpt2().encode("Hello, world")


def test_an_option_the_graph_is_not_known_to_express_is_refused_by_name(monkeypatch, tmp_path):
    monkeypatch.setattr(onnx_export_module, "EXPRESSES",
                        tuple(n for n in onnx_export_module.EXPRESSES if n != "pos_emb"))
    with pytest.raises(GptforgeError, match=r"^the ONNX export does not express the model option pos_emb;"):
        save_onnx(GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=8, pos_emb="rope")),
                  tmp_path)
    assert not list(tmp_path.iterdir())
    # at its default (GPT-2's value) the option changes nothing the graph does not already hold
    onnx_export_module.check_expressible(GPTConfig(block_size=8, vocab_size=11, n_head=2, n_embd=8))


def test_a_missing_onnx_package_is_one_line_naming_the_extra(run, tmp_path, monkeypatch, capsys):
    find_spec = onnx_export_module.importlib.util.find_spec
    monkeypatch.setattr(onnx_export_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxscript" else find_spec(name, *a))
    assert main(["export", f"--out_dir={run}", "--format=onnx", f"--to={tmp_path / 'out'}"]) == 2
    err = capsys.readouterr().err
    assert err == ("gptforge export: error: the ONNX export needs onnxscript: pip install 'gptforge[onnx]'\n")
    assert not (tmp_path / "out").exists()
