"""`gptforge export --format=gguf`: one `.gguf` file that llama.cpp runs (llama-cli, llama-server, Ollama,
llama-cpp-python), written with `gguf`, llama.cpp's own Python writer.

llama.cpp's `gpt2` architecture is GPT-2 as gptforge builds it: LayerNorm, the tanh GELU, learned positions,
biases everywhere, the head tied to the token embedding unless the file has its own `output.weight`. The
file holds the hyperparameters (`gpt2.*`), the weights under llama.cpp's tensor names (ggml's matrices are
nn.Linear's (out, in), so none is transposed), and the tokenizer as llama.cpp's byte-level BPE
(`tokenizer.ggml.*`): GPT-2's from its own files, a trained BPE's from its `tokenizers` JSON, and a char
vocabulary as a BPE whose only merges join the bytes of a multi-byte character. A chat model's markers are
control tokens of their ids and its template the Jinja `tokenizer.chat_template`.

Where the two differ, what the file holds (docs/deploy.md):
- `bias=False`: zero biases, the same function (llama.cpp's gpt2 requires them).
- `gelu_approximate="none"` (nanoGPT's exact GELU): llama.cpp's gpt2 computes the tanh GELU, which differs
  from the exact one by at most 5e-4 per activation; the export is allowed (the quick start's trained model:
  logits moved by 6.4e-3 at most, its greedy continuation unchanged).
- rows past the tokenizer (a 50304-row model of 50257 tokens): `[PAD<id>]` tokens of type UNUSED, which
  no text encodes to.
- a vocabulary without end-of-text (a char one): llama.cpp would take id 11 as end-of-generation, so the
  file names an `<|endoftext|>`: the first row past the vocabulary, or, when the model has none, a row it
  adds with a zero embedding (its logit is always 0; the other logits are unchanged).
- anything else llama.cpp's gpt2 cannot express (rotary positions, RMSNorm, ReLU² or SwiGLU, QK-norm, logit
  soft-capping) is refused, naming the option.

This module reads a `Run` and writes one file; it knows the model, the tokenizers and GGUF's keys.
"""

import json
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import torch

from gptforge.atomic import atomic_path
from gptforge.chat_template import JINJA, MARKERS, ChatTemplate, ChatTokenizer
from gptforge.errors import GptforgeError
from gptforge.mirror import fetch
from gptforge.model import NORM_EPS, GPTConfig
from gptforge.runs import Run
from gptforge.tokenizer import (
    EOT,
    GPT2_ENCODER_JSON,
    GPT2_VOCAB_BPE,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
)

GgufType = Literal["f32", "f16", "q8_0"]
ARCH = "gpt2"
# The GPTConfig fields llama.cpp's gpt2 expresses (bias=False as zero biases, an untied head as its own
# output.weight, the exact GELU as the tanh one) and those that only change the initialisation. Every other
# field changes the network: a value off GPT-2's is refused, naming it.
EXPRESSES = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "gelu_approximate",
             "tie_embeddings", "zero_init_proj")
CANNOT_EXPRESS = tuple(f.name for f in fields(GPTConfig) if f.name not in EXPRESSES)
# gptforge's module names and llama.cpp's tensor names: those of block i, then those around the blocks
BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}
EMBEDDINGS = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd"}
HEAD_NAMES = {"transformer.ln_f": "output_norm", "lm_head": "output"}
# Kept in float32 whatever --gguf_type says, as llama.cpp's own converter does: the vectors (norms, biases)
# and the position embedding, which is looked up, never multiplied.
ALWAYS_F32 = ("position_embd.weight",)
Q8_0_BLOCK = 32  # q8_0 quantizes each row in blocks of 32 values
# llama.cpp's token types (gguf.TokenType)
NORMAL, CONTROL, UNUSED = 1, 3, 5


@dataclass
class Vocabulary:
    """The tokenizer as GGUF stores it: one token per row of the model, their types, the BPE merges."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    eos: int | None  # end-of-text, also bos
    eot: int | None = None  # a chat model's end-of-turn


def write_gguf(run: Run, to: Path, gguf_type: GgufType = "f32") -> None:
    """The run's model, tokenizer and chat template as one GGUF file at `to`, written atomically; the 2-D
    weights as `gguf_type` (f32, f16, or q8_0: 8-bit blocks of 32)."""
    gguf = import_gguf()
    cfg = run.model.config
    check_expressible(cfg, gguf_type)
    vocab = vocabulary(run.tokenizer, cfg.vocab_size)
    qtype = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
             "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    with atomic_path(to) as tmp:
        writer = gguf.GGUFWriter(tmp, ARCH)
        writer.add_name(to.stem)
        writer.add_file_type(file_type)
        writer.add_context_length(cfg.block_size)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(4 * cfg.n_embd)
        writer.add_block_count(cfg.n_layer)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(NORM_EPS)
        add_vocabulary(writer, vocab, run.chat_template)
        for name, tensor in gguf_tensors(run, len(vocab.tokens)).items():
            array = tensor.detach().to("cpu", torch.float32).numpy()
            if array.ndim == 1 or name in ALWAYS_F32:
                writer.add_tensor(name, array)
            else:
                writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def import_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise GptforgeError("--format=gguf writes with the gguf package (llama.cpp's writer), which is not "
                            "installed: pip install 'gptforge[gguf]'") from None
    return gguf


def check_expressible(cfg: GPTConfig, gguf_type: str) -> None:
    """Refuse, in one line naming them, the options llama.cpp's gpt2 has no way to run."""
    options = cfg.off_gpt2(CANNOT_EXPRESS)
    if options:
        raise GptforgeError(
            f"--format=gguf writes llama.cpp's gpt2 architecture, which cannot express {', '.join(options)}; "
            "export this model with --format=onnx (or safetensors) instead"
        )
    if gguf_type == "q8_0" and cfg.n_embd % Q8_0_BLOCK:
        raise GptforgeError(f"--gguf_type=q8_0 quantizes rows in blocks of {Q8_0_BLOCK}, and n_embd="
                            f"{cfg.n_embd} is not a multiple of {Q8_0_BLOCK}; use --gguf_type=f16")


def gguf_tensors(run: Run, n_vocab: int) -> dict[str, torch.Tensor]:
    """The model's tensors under llama.cpp's names: zero biases where the model has none, the head only
    when untied, and the token embedding (and head) grown to `n_vocab` rows with zeros if the vocabulary
    adds one."""
    cfg = run.model.config
    state = run.model.state_dict()
    names = dict(EMBEDDINGS)
    for i in range(cfg.n_layer):
        names.update({f"transformer.h.{i}.{ours}": f"blk.{i}.{theirs}"
                      for ours, theirs in BLOCK_NAMES.items()})
    names.update(HEAD_NAMES)
    if cfg.tie_embeddings:
        del names["lm_head"]  # llama.cpp's gpt2 takes token_embd as the head when there is no output.weight
    tensors = {}
    for module, name in names.items():
        weight = state[f"{module}.weight"]
        if module in ("transformer.wte", "lm_head") and n_vocab > weight.size(0):
            weight = torch.cat([weight, weight.new_zeros(n_vocab - weight.size(0), weight.size(1))])
        tensors[f"{name}.weight"] = weight
        if module not in EMBEDDINGS and module != "lm_head":
            # bias=False: a zero bias is the same function, and llama.cpp's gpt2 requires one
            tensors[f"{name}.bias"] = state.get(f"{module}.bias", weight.new_zeros(weight.size(0)))
    return tensors


def add_vocabulary(writer: Any, vocab: Vocabulary, template: ChatTemplate | None) -> None:
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for a byte-level BPE
    writer.add_tokenizer_pre("gpt-2")  # GPT-2's pre-tokenizer regex, which every gptforge BPE uses
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.eos is not None:
        writer.add_bos_token_id(vocab.eos)
        writer.add_eos_token_id(vocab.eos)
    if vocab.eot is not None:
        writer.add_eot_token_id(vocab.eot)
    # gptforge's encode adds nothing to a text: neither shall llama.cpp's
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if template is not None:
        writer.add_chat_template(JINJA)


def vocabulary(tokenizer: Tokenizer, rows: int) -> Vocabulary:
    """The GGUF vocabulary of `tokenizer` (a chat model's markers included) for a model of `rows` rows."""
    template = tokenizer.template if isinstance(tokenizer, ChatTokenizer) else None
    base = tokenizer.base if isinstance(tokenizer, ChatTokenizer) else tokenizer
    if isinstance(base, GPT2Tokenizer):
        tokens, merges = gpt2_bpe(base.mirror)
    elif isinstance(base, BPETokenizer):
        tokens, merges = trained_bpe(base)
    elif isinstance(base, CharTokenizer):
        tokens, merges = char_bpe(base.chars)
    else:
        raise GptforgeError(f"--format=gguf has no llama.cpp form for a {base.kind} tokenizer")
    types = [CONTROL if token == EOT else NORMAL for token in tokens]
    specials = {}
    if template is not None:
        specials = {template.system: MARKERS["system"], template.user: MARKERS["user"],
                    template.assistant: MARKERS["assistant"], template.end: MARKERS["end"]}
    needed = max([len(tokens) - 1, *specials]) + 1
    if needed > rows:
        raise GptforgeError(f"the tokenizer has {needed} tokens and the model only {rows} rows")
    eos = base.eot_token if base.eot_token is not None or template is None else template.end
    if eos is None:
        # llama.cpp's gpt2 vocabulary ends generation at id 11 unless the file names an end-of-text
        eos = len(tokens)
        specials[eos] = EOT
        rows = max(rows, eos + 1)  # a model without a spare row gets one (gguf_tensors fills it with zeros)
    for i in range(len(tokens), rows):
        if i in specials:
            tokens.append(specials[i])
            types.append(CONTROL)
        else:
            tokens.append(f"[PAD{i}]")  # a row no token of the tokenizer has: never produced by a text
            types.append(UNUSED)
    return Vocabulary(tokens, types, merges, eos, template.end if template is not None else None)


def gpt2_bpe(mirror: Path | None) -> tuple[list[str], list[str]]:
    """GPT-2's 50257 tokens and 50000 merges from OpenAI's encoder.json and vocab.bpe (the mirror's copy,
    else downloaded once into a temporary directory)."""
    with tempfile.TemporaryDirectory() as scratch:
        encoder_json = fetch(GPT2_ENCODER_JSON, mirror, Path(scratch) / "encoder.json")
        encoder = json.loads(encoder_json.read_text("utf-8"))
        lines = fetch(GPT2_VOCAB_BPE, mirror, Path(scratch) / "vocab.bpe").read_text("utf-8").splitlines()
    tokens = [""] * len(encoder)
    for token, i in encoder.items():
        tokens[i] = token
    return tokens, [line for line in lines[1:] if line]  # the first line is "#version: 0.2"


def trained_bpe(tokenizer: BPETokenizer) -> tuple[list[str], list[str]]:
    """A trained byte-level BPE's tokens and merges from its `tokenizers` JSON."""
    spec = json.loads(tokenizer.to_json())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GptforgeError(f"--format=gguf writes byte-level BPE tokenizers, not a {model.get('type')} one")
    by_id = {i: token for token, i in model["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in spec.get("added_tokens", [])})
    tokens = [by_id[i] for i in range(len(by_id))]
    # older files write a merge as "a b", newer ones as ["a", "b"]; GGUF's is "a b"
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def char_bpe(chars: str) -> tuple[list[str], list[str]]:
    """A char vocabulary as a byte-level BPE: each character is the byte-level form of its UTF-8 bytes, and
    the merges join those bytes (a lead byte and what follows it: never two characters)."""
    alphabet = byte_alphabet()
    tokens = ["".join(alphabet[b] for b in c.encode("utf-8")) for c in chars]
    merges = list(dict.fromkeys(f"{token[:n]} {token[n]}" for token in tokens for n in range(1, len(token))))
    # llama.cpp requires the merges key and gguf writes no empty list: one that never applies (byte 0xFF is
    # in no UTF-8 text)
    return tokens, merges or [f"{alphabet[0xFF]} {alphabet[0xFF]}"]


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character (the printable Latin-1 ones as
    themselves, the rest from U+0100 on), as in OpenAI's encoder.py and llama.cpp's unicode.cpp."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {b: chr(b) for b in printable}
    for n, b in enumerate(b for b in range(256) if b not in alphabet):
        alphabet[b] = chr(256 + n)
    return alphabet
