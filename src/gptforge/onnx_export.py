"""`gptforge export --format=onnx`: the model as one ONNX decoder graph that onnxruntime runs step by step.

The graph (fp32, names as Hugging Face Optimum's, so ONNX tools that decode GPT-2 read them):

- inputs: `input_ids` (batch, sequence) int64, and per layer i `past_key_values.i.key` and
  `past_key_values.i.value` (batch, n_head, past_sequence, head_size) float32; past_sequence 0 at the first
  step. The new tokens sit at positions past_sequence .. past_sequence + sequence - 1: the rows of a batch
  advance together, as in `generate`'s KV cache, and there is no padding mask.
- outputs: `logits` (batch, sequence, vocab_size) of every new position, and `present.i.key` and
  `present.i.value`: the past with the new keys and values appended, the next step's past.

Every axis but the head's is dynamic. past_sequence + sequence must stay within `block_size`, as in gptforge.
`write_onnx` writes `model.onnx` beside a `config.json` (the `GPTConfig` and these names) and the run's
tokenizer (`tokenizer.json` for Hugging Face's `tokenizers`, `gptforge_tokenizer.json` for gptforge).
This module knows the model, its blocks and ONNX; it runs the blocks of model.py as they are, handing them a
cache (`PastKeyValues`) whose keys and values are the graph's inputs and outputs.
"""

import dataclasses
import importlib.util
import json
import logging
import warnings
from dataclasses import fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from gptforge import __version__
from gptforge.atomic import atomic_path, atomic_write_text
from gptforge.errors import GptforgeError
from gptforge.hf import save_hf_tokenizer
from gptforge.model import GPT, GPTConfig
from gptforge.runs import Run

ONNX_FILE = "model.onnx"
# weights over protobuf's 2 GiB limit go to this file beside the graph (GPT-2 XL's do)
DATA_FILE = "model.onnx.data"
CONFIG_FILE = "config.json"
FORMAT = "gptforge-onnx"  # config.json's "format"
EMBEDDED_LIMIT = 1_800_000_000  # bytes of weights kept inside model.onnx, with room for the graph
# The GPTConfig fields this graph is known to express, each checked against gptforge in
# tests/test_onnx_export.py. A field added later is refused by name, unless at its default, until it is.
EXPRESSES = (
    "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "gelu_approximate",
    "pos_emb", "norm", "mlp", "qk_norm", "tie_embeddings", "logit_softcap", "zero_init_proj",
)
# the packages torch.onnx.export(dynamo=True) needs; onnxruntime only runs the result
REQUIRED = ("onnx", "onnxscript")


def input_names(config: GPTConfig) -> list[str]:
    layers = range(config.n_layer)
    return ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")]


def output_names(config: GPTConfig) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(config.n_layer) for kv in ("key", "value")]


class PastKeyValues:
    """A cache made of the graph's tensors (the `kv_cache.Cache` the blocks ask): each layer's past keys and
    values come in, the new ones are appended, and the result (`present`) goes out."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    @property
    def pos(self) -> int:
        return self.past[0][0].size(2)  # symbolic under export: the past_sequence axis

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """KVCache.attend with one mask for every step: query t (at position past + t) sees keys up to its
        own position. One token sees every key; no past is the plain causal mask."""
        past_k, past_v = self.past[layer]
        keys, values = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
        self.present.append((keys, values))
        past, T = past_k.size(2), q.size(2)
        mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)

    def advance(self, length: int) -> None:
        pass  # the next step's past is this step's present, which the caller feeds back


class OnnxDecoder(nn.Module):
    """`GPT.hidden_states` and `GPT.head` over explicit past and present tensors, all positions' logits.

    The embedding lines are hidden_states' own, with the past length a symbolic size: hidden_states reads
    an int or a tensor of positions, and checks the length against block_size in Python, neither of which
    a graph with a dynamic past can hold."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(
        self, input_ids: torch.Tensor, past_key_values: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        model, T = self.model, input_ids.size(1)
        cache = PastKeyValues(past_key_values)
        past = cache.pos
        x = model.transformer.wte(input_ids)
        rope = None
        if model.rotary is not None:
            rope = model.rotary.cos[past : past + T], model.rotary.sin[past : past + T]
        else:
            x = x + model.transformer.wpe(past + torch.arange(T, dtype=torch.long, device=input_ids.device))
        for block in model.transformer.h:
            x = block(x, rope, cache)
        return model.head(model.transformer.ln_f(x)), cache.present


def check_expressible(config: GPTConfig) -> None:
    """Refuse, naming it, a model option the graph has not been checked to express."""
    unknown = [f.name for f in fields(config)
               if f.name not in EXPRESSES and getattr(config, f.name) != f.default]
    if unknown:
        raise GptforgeError(f"the ONNX export does not express the model option {', '.join(unknown)}; "
                            "export --format=safetensors instead")


def check_packages() -> None:
    missing = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if missing:
        raise GptforgeError(f"the ONNX export needs {' and '.join(missing)}: pip install 'gptforge[onnx]'")


def onnx_program(model: GPT) -> "torch.onnx.ONNXProgram":
    """The decoder graph of `model` (traced by torch.export, on the CPU in fp32, with dynamic axes)."""
    check_expressible(model.config)
    check_packages()
    config = model.config
    decoder = OnnxDecoder(model).eval()
    n_head, head_size = config.n_head, config.n_embd // config.n_head
    # example sizes other than 0 and 1, which torch.export would take for constants
    batch, sequence, past = 2, min(3, config.block_size), 2
    input_ids = torch.zeros(batch, sequence, dtype=torch.long)
    past_key_values = [tuple(torch.zeros(batch, n_head, past, head_size) for _ in "kv")
                       for _ in range(config.n_layer)]
    Dim = torch.export.Dim
    batch_dim = Dim("batch")
    sequence_dim = Dim("sequence", min=1, max=config.block_size)
    past_dim = Dim("past_sequence", min=0, max=config.block_size - 1)
    past_shape = {0: batch_dim, 2: past_dim}
    dynamic_shapes = ({0: batch_dim, 1: sequence_dim}, [(past_shape, past_shape)] * config.n_layer)
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    # the exporter's notes on its own internals (no torchvision, deprecated pytree helpers, an axis name
    # shared by several inputs, which is the intent) are no news to the user; its failures are exceptions
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                decoder, (input_ids, past_key_values), dynamo=True, dynamic_shapes=dynamic_shapes,
                input_names=input_names(config), output_names=output_names(config), verbose=False,
            )
    finally:
        logger.setLevel(level)


def save_onnx(model: GPT, directory: str | Path) -> None:
    """`model.onnx` (its weights in `model.onnx.data` beside it when over 2 GB) and a `config.json` naming
    the graph's inputs and outputs, each file written atomically."""
    import onnx_ir  # onnxscript's, which check_packages has found

    directory = Path(directory)
    program = onnx_program(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    external = DATA_FILE if weight_bytes > EMBEDDED_LIMIT else None
    with atomic_path(directory / ONNX_FILE) as tmp:
        # the external data is named for the final file and written beside it
        onnx_ir.save(program.model, tmp, external_data=external)
    config = {
        "format": FORMAT, "gptforge_version": __version__, "file": ONNX_FILE,
        "model_args": dataclasses.asdict(model.config),
        "inputs": input_names(model.config), "outputs": output_names(model.config),
        "past_shape": ["batch", model.config.n_head, "past_sequence",
                       model.config.n_embd // model.config.n_head],
    }
    atomic_write_text(directory / CONFIG_FILE, json.dumps(config, indent=2) + "\n")


def write_onnx(run: Run, to: Path) -> None:
    """The run's model as an onnxruntime decoder graph, with its tokenizer in both forms."""
    from gptforge.export import save_tokenizer  # export.py lists this writer: imported here, not at the top

    save_onnx(run.model, to)
    save_hf_tokenizer(run.tokenizer, to, run.model.config.block_size)
    save_tokenizer(run.tokenizer, to)
