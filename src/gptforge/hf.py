"""Hugging Face GPT-2 interop: load HF GPT-2 checkpoints into `GPT` and export `GPT` as an HF directory, with
the tokenizer files that make `AutoTokenizer` and `pipeline("text-generation", ...)` work on it.

Reads and writes the files themselves (config.json + safetensors, or a weights-only pytorch_model.bin), so
neither direction needs `transformers`; the hub is reached through `huggingface_hub` only for a model name.
HF's GPT-2 stores its matmul weights as Conv1D, (in, out): the transpose of `nn.Linear`'s (out, in).
This module knows the model, the tokenizers and HF's file layout; it never imports `transformers`.
"""

import json
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import tokenizers
import torch
from safetensors.torch import save_file

from gptforge.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from gptforge.chat_template import JINJA, MARKERS, ChatTokenizer
from gptforge.checkpoint import clean_state_dict, read_json, read_safetensors, read_weights_bin
from gptforge.errors import GptforgeError
from gptforge.mirror import fetch
from gptforge.model import GPT, GPTConfig
from gptforge.tokenizer import (
    EOT,
    GPT2_ENCODER_JSON,
    GPT2_VOCAB_BPE,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    Tokenizer,
)

# Model names and their repositories on the Hugging Face hub.
PRETRAINED = {
    "gpt2": "openai-community/gpt2",  # 124M params
    "gpt2-medium": "openai-community/gpt2-medium",  # 350M
    "gpt2-large": "openai-community/gpt2-large",  # 774M
    "gpt2-xl": "openai-community/gpt2-xl",  # 1558M
}
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# HF activation names and the nn.GELU approximation each one is.
ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}
LAYER_NORM_EPS = 1e-5
# The GPTConfig fields GPT-2's config.json expresses (bias=False as zero biases), and those that change only
# the initialisation, not the function (a model trained with them exports). Every other field changes the
# network, and GPT2LMHeadModel is only its GPT-2 default: an export of any other value is refused, naming it.
HF_EXPRESSES = (
    "block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "gelu_approximate"
)
INIT_ONLY = ("zero_init_proj",)
ARCHITECTURE_OPTIONS = tuple(f.name for f in fields(GPTConfig) if f.name not in (*HF_EXPRESSES, *INIT_ONLY))
EOT_TOKEN = 50256  # GPT-2's <|endoftext|>
# WordLevel needs an unknown token; absent from the vocabulary, an unknown char is an error
UNKNOWN_CHAR = "[UNK]"


def resolve_pretrained(name_or_dir: str | Path) -> Path:
    """The local directory of a GPT-2 checkpoint: `name_or_dir` itself, or a hub download of a known name."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    name = str(name_or_dir)
    if name not in PRETRAINED:
        raise GptforgeError(
            f"{name!r} is neither a local directory nor a known model; use a directory holding an HF GPT-2 "
            f"checkpoint (config.json + model.safetensors) or one of: {', '.join(PRETRAINED)}"
        )
    from huggingface_hub import snapshot_download

    patterns = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*.safetensors"]
    try:
        return Path(snapshot_download(PRETRAINED[name], allow_patterns=patterns))
    except Exception as e:  # offline, DNS failure, no cache: huggingface_hub raises many kinds
        raise GptforgeError(
            f"cannot fetch {name} from the Hugging Face hub ({type(e).__name__}); without network, download "
            f"{PRETRAINED[name]} elsewhere (config.json and model.safetensors) and pass its directory "
            f"instead of {name!r}"
        ) from None


def read_hf_config(directory: Path) -> GPTConfig:
    """The `GPTConfig` of an HF GPT-2 directory, refusing architectures that are not GPT-2's."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise GptforgeError(f"{directory} has no config.json: it is not a Hugging Face model directory")
    hf = read_json(config_path)
    problems = []
    if hf.get("model_type") != "gpt2":
        problems.append(f"model_type is {hf.get('model_type')!r}, not 'gpt2'")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        problems.append(f"activation_function {activation!r} is none of {', '.join(ACTIVATIONS)}")
    if hf.get("n_inner") not in (None, 4 * hf.get("n_embd", 0)):
        problems.append(f"n_inner {hf['n_inner']} is not 4 * n_embd")
    if not math.isclose(hf.get("layer_norm_epsilon", LAYER_NORM_EPS), LAYER_NORM_EPS):
        problems.append(f"layer_norm_epsilon {hf['layer_norm_epsilon']} is not {LAYER_NORM_EPS}")
    if not hf.get("scale_attn_weights", True) or hf.get("scale_attn_by_inverse_layer_idx", False):
        problems.append("attention scaling differs from GPT-2's 1/sqrt(head_size)")
    if not hf.get("tie_word_embeddings", True):
        problems.append("the output head is not tied to the token embedding")
    if problems:
        raise GptforgeError(f"{directory} is not a GPT-2 checkpoint gptforge can load: {'; '.join(problems)}")
    return GPTConfig(
        block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"], n_head=hf["n_head"],
        n_embd=hf["n_embd"], bias=True, gelu_approximate=ACTIVATIONS[activation],  # type: ignore[arg-type]
    )


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory: safetensors (one file or shards) or a weights-only .bin."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index)["weight_map"].values()))
        return {k: v for shard in shards for k, v in read_safetensors(directory / shard).items()}
    if (directory / "model.safetensors").is_file():
        return read_safetensors(directory / "model.safetensors")
    if (directory / "pytorch_model.bin").is_file():
        return read_weights_bin(directory / "pytorch_model.bin")
    raise GptforgeError(f"{directory} has no model.safetensors or pytorch_model.bin")


def load_hf_gpt2(name_or_dir: str | Path, override_args: dict[str, Any] | None = None) -> GPT:
    """A `GPT` holding HF GPT-2 weights; only `dropout` may be overridden (the rest is the checkpoint's)."""
    override_args = override_args or {}
    if set(override_args) - {"dropout"}:
        raise GptforgeError(
            "only dropout can be overridden for a pretrained model, not "
            f"{sorted(set(override_args) - {'dropout'})}; shrink the context with model.crop_block_size(n)"
        )
    directory = resolve_pretrained(name_or_dir)
    config = read_hf_config(directory)
    config.dropout = override_args.get("dropout", config.dropout)
    model = GPT(config)

    hf_weights = clean_state_dict(read_hf_weights(directory))
    state_dict = {}
    for key, value in hf_weights.items():
        key = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        state_dict[key] = value.t() if key.endswith(CONV1D_WEIGHTS) else value
    wte = state_dict["transformer.wte.weight"]
    head = state_dict.setdefault("lm_head.weight", wte)
    if not torch.equal(head, wte):
        raise GptforgeError(f"{directory}: lm_head.weight differs from the token embedding; GPT-2 ties them")
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if missing or unexpected:
        raise GptforgeError(f"{directory}: weights do not match GPT-2 "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise GptforgeError(f"{directory}: {key} has shape {tuple(value.shape)}, "
                                f"config.json implies {tuple(expected[key].shape)}")
    model.load_state_dict(state_dict)
    return model


def save_hf_gpt2(
    model: GPT, directory: str | Path, eot_token: int | None = EOT_TOKEN, end_of_turn: int | None = None
) -> None:
    """Write `config.json`, `generation_config.json` and `model.safetensors` that
    `transformers.GPT2LMHeadModel` loads as this model.

    `bias=False` models get zero biases (the same function); a padded vocabulary (e.g. 50304) stays as it is.
    A model with any of the `ARCHITECTURE_OPTIONS` off GPT-2's value is refused, naming them. `eot_token` (the
    tokenizer's end-of-text, GPT-2's by default) becomes bos/eos where the vocabulary has it, else they are
    written as null, and a chat model's `end_of_turn` also ends generation: left out, transformers would take
    GPT-2's 50256, a row a small vocabulary does not have.
    """
    if not isinstance(model, GPT):
        raise GptforgeError(f"to_hf exports gptforge GPT models, not {type(model).__name__}")
    cfg = model.config
    options = cfg.off_gpt2(ARCHITECTURE_OPTIONS)
    if options:
        raise GptforgeError(
            f"to_hf writes GPT-2 (GPT2LMHeadModel), and this model is not GPT-2: {', '.join(options)}; "
            "export it in gptforge's own format instead (gptforge export --format=safetensors)"
        )
    directory = Path(directory)
    state_dict = model.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            continue  # tied: HF re-ties it to transformer.wte.weight on load
        value = value.detach().to("cpu", torch.float32)
        tensors[key] = (value.t() if key.endswith(CONV1D_WEIGHTS) else value).contiguous()
        bias_key = key.removesuffix(".weight") + ".bias"
        is_embedding = key in ("transformer.wte.weight", "transformer.wpe.weight")
        if key.endswith(".weight") and not is_embedding and bias_key not in state_dict:
            tensors[bias_key] = torch.zeros(value.shape[0])  # bias=False: a zero bias is the same function
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": None,
        "activation_function": "gelu_new" if cfg.gelu_approximate == "tanh" else "gelu",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": cfg.dropout,
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "tie_word_embeddings": True,
        "use_cache": True,
        "torch_dtype": "float32",
    }
    eot = eot_token if eot_token is not None and eot_token < cfg.vocab_size else None
    hf_config.update(bos_token_id=eot, eos_token_id=eot)
    # a chat model's answer ends at its end-of-turn marker
    stops = [t for t in (end_of_turn, eot) if t is not None]
    generation = {"bos_token_id": eot, "eos_token_id": stops[0] if len(stops) == 1 else stops or None,
                  "pad_token_id": eot, "max_length": cfg.block_size}
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / "generation_config.json", json.dumps(generation, indent=2) + "\n")
    atomic_write_text(directory / "config.json", json.dumps(hf_config, indent=2) + "\n")


def save_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path, block_size: int) -> None:
    """Write the tokenizer files `transformers.AutoTokenizer.from_pretrained(directory)` loads as `tokenizer`:
    the same ids for every text. `tokenizer.json` (HF `tokenizers`, the fast tokenizer) and
    `tokenizer_config.json`; GPT-2's also as the `vocab.json` + `merges.txt` its slow tokenizer reads. A chat
    model's markers become special tokens of the same ids and its template the Jinja `chat_template`, so
    `apply_chat_template` renders exactly gptforge's ids."""
    directory = Path(directory)
    template = tokenizer.template if isinstance(tokenizer, ChatTokenizer) else None
    tokenizer = tokenizer.base if isinstance(tokenizer, ChatTokenizer) else tokenizer
    special: dict[str, Any] = {}
    if tokenizer.eot_token is not None:
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    if isinstance(tokenizer, GPT2Tokenizer):
        files = {}
        for remote, name in ((GPT2_ENCODER_JSON, "vocab.json"), (GPT2_VOCAB_BPE, "merges.txt")):
            files[name] = fetch(remote, tokenizer.mirror, directory / name)
            if files[name] != directory / name:  # the mirror's copy
                atomic_write_bytes(directory / name, files[name].read_bytes())
        fast = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(
            str(directory / "vocab.json"), str(directory / "merges.txt")))
        fast.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        fast.decoder = tokenizers.decoders.ByteLevel()
        fast.add_special_tokens([EOT])
        tokenizer_class = "GPT2Tokenizer"
    elif isinstance(tokenizer, BPETokenizer):  # already a `tokenizers` file: the very one gptforge reads back
        fast = tokenizers.Tokenizer.from_str(tokenizer.to_json())
        tokenizer_class = "PreTrainedTokenizerFast"
    elif isinstance(tokenizer, CharTokenizer):
        # one token per character: every character is its own pre-token, looked up whole, joined back as is
        fast = tokenizers.Tokenizer(tokenizers.models.WordLevel({c: i for i, c in enumerate(tokenizer.chars)},
                                                                unk_token=UNKNOWN_CHAR))
        fast.pre_tokenizer = tokenizers.pre_tokenizers.Split(tokenizers.Regex(r"[\s\S]"), behavior="isolated")
        fast.decoder = tokenizers.decoders.Fuse()
        tokenizer_class = "PreTrainedTokenizerFast"
    else:
        raise GptforgeError(f"no Hugging Face form for a {tokenizer.kind} tokenizer")
    if template is not None:  # added in id order, each takes the next id: the template's own
        markers = sorted([(template.system, MARKERS["system"]), (template.user, MARKERS["user"]),
                          (template.assistant, MARKERS["assistant"]), (template.end, MARKERS["end"])])
        if markers[0][0] != fast.get_vocab_size(with_added_tokens=True):
            raise GptforgeError("the chat template's markers do not follow the tokenizer's vocabulary")
        fast.add_special_tokens([text for _, text in markers])
        special = {**special, "eos_token": MARKERS["end"],
                   "additional_special_tokens": list(MARKERS.values())}
    atomic_write_text(directory / "tokenizer.json", fast.to_str())
    config = {"tokenizer_class": tokenizer_class, "model_max_length": block_size, "add_prefix_space": False,
              "clean_up_tokenization_spaces": False, **special,
              **({"chat_template": JINJA} if template is not None else {})}
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(special, indent=2) + "\n")
