"""Tests for gptforge.nanogpt_export: `gptforge export --format=nanogpt`, a ckpt.pt for nanoGPT's sample.py.

nanoGPT's model is GPT-2's network as transformers computes it with the exact GELU (nanoGPT's own
`from_pretrained` copies GPT2LMHeadModel's weights into it, transposing the Conv1D matrices). So the files are
loaded here as sample.py loads them (`torch.load(weights_only=True)`, `GPTConfig(**model_args)` of
nanoGPT's seven fields, a strict `load_state_dict`, its char `meta.pkl`) into transformers' GPT-2 by that
mapping, and its logits are compared with gptforge's. With GPTFORGE_NANOGPT=path/to/nanoGPT (a checkout),
nanoGPT's own sample.py runs on the exports too, its greedy text compared with gptforge's.

    .venv/bin/python -m pytest tests/test_nanogpt_export.py
"""

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import jittered, tiny_run

from gptforge import GPT, GPTConfig
from gptforge.chat_template import ChatTemplate, ChatTokenizer
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.generate import generate
from gptforge.mirror import mirror_dir
from gptforge.nanogpt_export import MODEL_ARGS, write_nanogpt
from gptforge.runs import Run, load_run
from gptforge.tokenizer import GPT2Tokenizer

transformers = pytest.importorskip("transformers")

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# nanoGPT runs a tanh-GELU model with the exact GELU: at most 5e-4 per activation; on these models' logits
TANH_AS_EXACT_ATOL = 5e-3


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("nanogpt"))


def as_nanogpt_loads(directory: Path) -> tuple[dict, "transformers.GPT2LMHeadModel"]:
    """What sample.py does with `directory/ckpt.pt`, into transformers' GPT-2 by nanoGPT's mapping."""
    ckpt = torch.load(directory / "ckpt.pt", map_location="cpu", weights_only=True)
    args = ckpt["model_args"]
    assert set(args) == set(MODEL_ARGS)  # nanoGPT's GPTConfig(**model_args) takes these and no others
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=args["vocab_size"], n_positions=args["block_size"], n_embd=args["n_embd"],
        n_layer=args["n_layer"], n_head=args["n_head"], activation_function="gelu", layer_norm_epsilon=1e-5,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).eval()
    state = {k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()}
    assert torch.equal(state["lm_head.weight"], state["transformer.wte.weight"])  # nanoGPT ties them
    expected = {k for k in hf.state_dict() if not k.endswith((".attn.bias", ".attn.masked_bias"))}
    biases = {k for k in expected if k.endswith(".bias")}
    assert set(state) == expected - (set() if args["bias"] else biases)  # strict: nothing missing or extra
    with torch.no_grad():
        for k in expected:
            value = state.get(k)
            if value is None:  # bias=False: nanoGPT has none, GPT-2's zero is the same function
                hf.state_dict()[k].zero_()
            else:
                hf.state_dict()[k].copy_(value.t() if k.endswith(CONV1D) else value)
    return ckpt, hf


def logits(model, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(model, GPT):
            return model(idx, idx)[0]
        return model(idx).logits


@pytest.mark.parametrize("options", [{}, {"bias": False}, {"gelu_approximate": "none"}])
def test_a_gpt2_bpe_model_computes_in_nanogpt_what_it_does_in_gptforge(tmp_path, options):
    config = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304, **options)
    model = jittered(config)
    write_nanogpt(Run(model, GPT2Tokenizer(mirror_dir(None)), {"config": {"dataset": "owt"}}), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # sample.py falls back to GPT-2 BPE
    ckpt, nanogpt = as_nanogpt_loads(tmp_path)
    assert ckpt["config"] == {"dataset": "owt"} and ckpt["model_args"]["vocab_size"] == 50304
    idx = torch.randint(0, 50257, (2, 64))
    atol = 1e-5 if config.gelu_approximate == "none" else TANH_AS_EXACT_ATOL
    torch.testing.assert_close(logits(nanogpt, idx), logits(model, idx), rtol=0, atol=atol)


def test_the_cli_writes_a_char_run_with_its_meta_pkl(run, tmp_path):
    assert main(["export", f"--out_dir={run}", "--format=nanogpt", f"--to={tmp_path}"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "meta.pkl"]  # nothing half-written
    with open(tmp_path / "meta.pkl", "rb") as f:
        meta = pickle.load(f)  # written by the test's own export: trusted
    tokenizer = load_run(run).tokenizer
    assert meta["vocab_size"] == len(tokenizer.chars)
    assert "".join(meta["itos"][i] for i in range(meta["vocab_size"])) == tokenizer.chars
    assert meta["stoi"] == {c: i for i, c in enumerate(tokenizer.chars)}
    ckpt, nanogpt = as_nanogpt_loads(tmp_path)
    assert ckpt["config"]["dataset"] == "sonnet"
    model = load_run(run).model.eval()
    idx = torch.randint(0, model.config.vocab_size, (2, model.config.block_size))
    torch.testing.assert_close(logits(nanogpt, idx), logits(model, idx), rtol=0, atol=TANH_AS_EXACT_ATOL)


@pytest.mark.parametrize(("options", "named"), [
    ({"pos_emb": "rope"}, "pos_emb='rope'"), ({"norm": "rmsnorm"}, "norm='rmsnorm'"),
    ({"mlp": "relu2"}, "mlp='relu2'"), ({"qk_norm": True}, "qk_norm=True"),
    ({"tie_embeddings": False}, "tie_embeddings=False"), ({"logit_softcap": 15.0}, "logit_softcap=15.0"),
])
def test_options_nanogpt_cannot_express_are_refused_by_name(tmp_path, options, named):
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=50304, **options))
    with pytest.raises(GptforgeError, match=f"cannot express {named}"):
        write_nanogpt(Run(model, GPT2Tokenizer(mirror_dir(None)), {}), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_chat_model_is_refused(run, tmp_path):
    loaded = load_run(run)
    chat = ChatTokenizer(loaded.tokenizer, ChatTemplate.for_tokenizer(loaded.tokenizer))
    with pytest.raises(GptforgeError, match="no chat template"):
        write_nanogpt(Run(loaded.model, chat, {}), tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- nanoGPT's own sample.py, where a checkout is at hand --

NANOGPT = os.environ.get("GPTFORGE_NANOGPT")
needs_nanogpt = pytest.mark.skipif(not NANOGPT, reason="set GPTFORGE_NANOGPT to a nanoGPT checkout")
GPT2_FILES = {"vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
              "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"}


def nanogpt_sample(workdir: Path, export: Path, prompt: str, n: int, env: dict[str, str]) -> str:
    """nanoGPT's sample.py, greedy (top_k=1), run from a copy of the checkout's scripts in `workdir`."""
    for name in ("sample.py", "model.py", "configurator.py"):
        shutil.copy(Path(NANOGPT) / name, workdir / name)
    out = subprocess.run(
        [sys.executable, "sample.py", f"--out_dir={export}", "--device=cpu", "--dtype=float32",
         "--num_samples=1", f"--max_new_tokens={n}", "--top_k=1", f"--start={prompt}"],
        cwd=workdir, capture_output=True, text=True, env={**os.environ, **env}, check=True).stdout
    # "Loading meta from ...pkl..." or "No meta.pkl found, assuming GPT-2 encodings...", then the sample
    return out.split("...\n", 1)[1].rsplit("\n---------------\n", 1)[0]


@needs_nanogpt
def test_nanogpt_s_sample_py_continues_a_char_run_as_gptforge_does(run, tmp_path):
    export = tmp_path / "export"
    assert main(["export", f"--out_dir={run}", "--format=nanogpt", f"--to={export}"]) == 0
    (tmp_path / "data" / "sonnet").mkdir(parents=True)
    shutil.copy(export / "meta.pkl", tmp_path / "data" / "sonnet" / "meta.pkl")
    loaded = load_run(run)
    prompt = "Shall I"
    ids = generate(loaded.model, torch.tensor([loaded.tokenizer.encode(prompt)]), 24, top_k=1)
    assert nanogpt_sample(tmp_path, export, prompt, 24, {}) == loaded.tokenizer.decode(ids[0].tolist())


@needs_nanogpt
def test_nanogpt_s_sample_py_continues_a_gpt2_bpe_model_as_gptforge_does(tmp_path):
    model = jittered(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=50304,
                               gelu_approximate="none"))
    tokenizer = GPT2Tokenizer(mirror_dir(None))
    export = tmp_path / "export"
    write_nanogpt(Run(model, tokenizer, {"config": {"dataset": "owt"}}), export)
    cache = tmp_path / "tiktoken"  # tiktoken's gpt2 files from the data mirror, where tiktoken looks first
    cache.mkdir()
    for name, url in GPT2_FILES.items():
        shutil.copy(mirror_dir(None) / "gpt2" / name, cache / hashlib.sha1(url.encode()).hexdigest())
    prompt = "The meaning of life is"
    ids = generate(model, torch.tensor([tokenizer.encode(prompt)]), 16, top_k=1)
    text = nanogpt_sample(tmp_path, export, prompt, 16, {"TIKTOKEN_CACHE_DIR": str(cache)})
    assert text == tokenizer.decode(ids[0].tolist())
