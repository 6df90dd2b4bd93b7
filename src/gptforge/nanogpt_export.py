"""`gptforge export --format=nanogpt`: a run as nanoGPT's own `sample.py` (and `model.py`) load it.

nanoGPT's `ckpt.pt` is a torch file of plain data that `torch.load(..., weights_only=True)` reads:
- `model`: the state dict of nanoGPT's `GPT` (nn.Linear layout, GPT-2's module names, the tied head under
  both `transformer.wte.weight` and `lm_head.weight`; `load_state_dict` is strict);
- `model_args`: exactly the fields of nanoGPT's `GPTConfig` (`GPTConfig(**model_args)` refuses any other);
- `config`: the settings of nanoGPT's train.py; sample.py reads `config["dataset"]` to find a char model's
  vocabulary at `data/<dataset>/meta.pkl`, and otherwise decodes with tiktoken's GPT-2 BPE.
So a char run also gets nanoGPT's `meta.pkl` ({vocab_size, itos, stoi}) beside `ckpt.pt`, to copy to that
place; a GPT-2 BPE run needs none. A trained BPE or a chat model's markers have no form in sample.py and are
refused, as is any architecture option nanoGPT's model does not have. nanoGPT's MLP is the exact (erf) GELU: a
model trained with GPT-2's tanh one is written as it is and runs there with the exact one, as nanoGPT runs
GPT-2's own weights (the activations differ by at most 5e-4).

The checkpoint holds no optimizer state: nanoGPT samples from it (or finetunes it with `init_from='resume'`
after a fresh optimizer: its train.py expects one). This module reads a `Run` and writes files.
"""

import pickle
from dataclasses import fields
from pathlib import Path

import torch

from gptforge.atomic import atomic_path
from gptforge.chat_template import ChatTokenizer
from gptforge.errors import GptforgeError
from gptforge.model import GPTConfig
from gptforge.runs import Run
from gptforge.tokenizer import CharTokenizer, GPT2Tokenizer

CHECKPOINT = "ckpt.pt"
META_PKL = "meta.pkl"
# nanoGPT's GPTConfig, field for field: everything its model can be
MODEL_ARGS = ("n_layer", "n_head", "n_embd", "block_size", "bias", "vocab_size", "dropout")
# gptforge options nanoGPT's model has no switch for (gelu_approximate: see the module docstring)
CANNOT_EXPRESS = tuple(f.name for f in fields(GPTConfig)
                       if f.name not in (*MODEL_ARGS, "gelu_approximate", "zero_init_proj"))


def write_nanogpt(run: Run, to: Path) -> None:
    """`ckpt.pt` (and a char run's `meta.pkl`) in `to`, as nanoGPT's sample.py reads them."""
    cfg = run.model.config
    options = cfg.off_gpt2(CANNOT_EXPRESS)
    if options:
        raise GptforgeError(f"--format=nanogpt writes nanoGPT's GPT-2 model, which cannot express "
                            f"{', '.join(options)}; export this model with --format=safetensors or onnx")
    tokenizer = run.tokenizer
    if isinstance(tokenizer, ChatTokenizer):
        raise GptforgeError("nanoGPT's sample.py has no chat template for this chat model's turns; export it "
                            "with --format=hf or --format=gguf, which carry the template")
    if not isinstance(tokenizer, CharTokenizer | GPT2Tokenizer):
        raise GptforgeError(f"nanoGPT's sample.py decodes GPT-2 BPE or a char meta.pkl, not this run's "
                            f"{tokenizer.kind} tokenizer; export with --format=hf instead")
    dataset = (run.checkpoint.get("config") or {}).get("dataset") or "gptforge"
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in run.model.state_dict().items()}
    state["lm_head.weight"] = state["transformer.wte.weight"]  # nanoGPT ties them: one tensor, both names
    checkpoint = {
        "model": state,
        "model_args": {name: getattr(cfg, name) for name in MODEL_ARGS},
        "config": {"dataset": dataset},
        "iter_num": int(run.checkpoint.get("iter_num", 0)),
        "best_val_loss": float(run.checkpoint.get("best_val_loss", float("inf"))),
    }
    to.mkdir(parents=True, exist_ok=True)
    if isinstance(tokenizer, CharTokenizer):
        chars = tokenizer.chars
        meta = {"vocab_size": len(chars), "itos": dict(enumerate(chars)),
                "stoi": {c: i for i, c in enumerate(chars)}}
        with atomic_path(to / META_PKL) as tmp, open(tmp, "wb") as f:
            pickle.dump(meta, f)
    with atomic_path(to / CHECKPOINT) as tmp:
        torch.save(checkpoint, tmp)
