"""`gptforge sft`: supervised finetuning of a base model on conversations, in full or with LoRA adapters.

The base is a gptforge run directory, GPT-2 (`gpt2*`) or a Hugging Face GPT-2 directory, with the tokenizer it
was trained with. The chat template's four markers take the ids right after that tokenizer's vocabulary
(chat_template.py); a model without those rows grows them, and says so. The conversations
(data/conversations.py) then train through the very `Trainer` of pretraining, so every training option, exact
resume (kill -9 included) and torchrun's world-size-independent batches hold as they do there; the loss is on
what the assistant says.

With `--lora_rank`, the base is frozen and only LoRA adapters train (lora.py): the optimizer holds the
adapters alone, and the checkpoint holds the adapters, the rows the template grew, and the base's name and
fingerprint, from which every reader rebuilds the model (runs.py). `gptforge export` merges the adapters into
the weights. This module wires those pieces; it knows no HTTP and writes only through the trainer.
"""

import dataclasses
from dataclasses import dataclass

import torch
from tqdm import tqdm

from gptforge import distributed as distrib
from gptforge.chat_template import ChatTemplate, ChatTokenizer
from gptforge.checkpoint import load_checkpoint, model_from_checkpoint
from gptforge.config import TrainConfig
from gptforge.data.conversations import ConversationData, Conversations
from gptforge.device import resolve_compile, resolve_device, resolve_dtype
from gptforge.errors import GptforgeError
from gptforge.lora import TARGETS, apply_lora, base_fingerprint, trainable_report
from gptforge.mirror import mirror_dir
from gptforge.model import GPT, MODEL_KEYS
from gptforge.options import option
from gptforge.runs import adapted_model
from gptforge.source import load_source
from gptforge.tokenizer import Tokenizer, from_spec
from gptforge.train import Progress, Trainer


@dataclass
class SFTConfig(TrainConfig):
    """Every training option, with finetuning's defaults, and the conversations and LoRA options."""

    init_from: str = option("", "the base: a run directory, gpt2*, a Hugging Face GPT-2 directory; or resume")
    out_dir: str = option("out-sft", "the finetuned run's directory")
    data: str = option(
        "", "conversations: a .jsonl file (OpenAI messages or Alpaca lines) or a HF dataset id"
    )
    val_data: str | None = option(None, "held-out conversations (default: --val_fraction of --data)")
    val_fraction: float = option(0.05, "the share of --data held out when there is no --val_data")
    block_size: int = option(1024, "the context: conversations longer are dropped (at most the base's)")
    batch_size: int = option(16, "conversations per micro-step per process")
    gradient_accumulation_steps: int = option(1, "micro-steps per optimizer step, over all processes")
    learning_rate: float = option(1e-4, "peak learning rate")
    max_iters: int = option(1000, "total optimizer steps")
    lr_decay_iters: int = option(1000, "cosine: iterations to decay over")
    min_lr: float = option(1e-5, "the learning rate at the end of the decay")
    warmup_iters: int = option(50, "iterations of linear warm-up")
    eval_interval: int = option(100, "evaluate (and checkpoint) every this many iterations")
    eval_iters: int = option(20, "batches per split in each evaluation")
    weight_decay: float = option(0.0, "AdamW weight decay")
    mirror: str | None = option(None, "local mirror of the tokenizer files (default: $GPTFORGE_DATA_MIRROR)")
    lora_rank: int | None = option(
        None, "train LoRA adapters of this rank, the base frozen (None: every weight)"
    )
    lora_alpha: float = option(16.0, "LoRA's scale is lora_alpha / lora_rank")
    lora_targets: str = option("c_attn", f"the linears LoRA adapts, comma-separated: {', '.join(TARGETS)}")
    lora_dropout: float = option(0.0, "dropout on the LoRA path")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.val_fraction < 1:
            raise GptforgeError(f"--val_fraction={self.val_fraction} must be between 0 and 1 (exclusive)")

    def targets(self) -> list[str]:
        return [t.strip() for t in self.lora_targets.split(",") if t.strip()]


def sft(cfg: SFTConfig) -> Progress:
    """Finetune as `cfg` says; under torchrun, every process calls this. Returns where it ended."""
    d = distrib.setup(resolve_device(cfg.device), cfg.backend)
    try:
        cfg = dataclasses.replace(cfg, device=d.device, dtype=resolve_dtype(cfg.dtype, d.device),
                                  compile=resolve_compile(cfg.compile, d.device))
        return finetuner(cfg, d).run()
    finally:
        distrib.teardown()


def finetuner(cfg: SFTConfig, d: distrib.Dist) -> Trainer:
    """The trainer of a finetuning run: its base (or its own checkpoint, resumed), template and
    conversations."""
    if not cfg.init_from:
        raise GptforgeError("name the base model: --init_from=RUN_DIR, gpt2* or an HF GPT-2 directory")
    if not cfg.data:
        raise GptforgeError("name the conversations: --data=FILE.jsonl or a Hugging Face dataset id")
    mirror = mirror_dir(cfg.mirror)
    say = tqdm.write if d.is_main else lambda _: None
    if cfg.init_from == "resume":
        ckpt = load_checkpoint(cfg.out_dir, which="latest")
        if "sft" not in ckpt:
            raise GptforgeError(f"{cfg.out_dir} is not a finetuning run; resume it with `gptforge train`")
        sft_state = ckpt["sft"]
        tokenizer = from_spec(ckpt["tokenizer"], cfg.out_dir, mirror)
        template = ChatTemplate.from_spec(ckpt["chat_template"])
        model = adapted_model(ckpt, mirror) if "lora" in ckpt else model_from_checkpoint(ckpt, cfg.out_dir)
        model.set_dropout(cfg.dropout)
        lora = ckpt.get("lora")
    else:
        model, tokenizer, template, sft_state = base_model(cfg, mirror, say)
        lora = None
        if cfg.lora_rank is not None:
            if cfg.parallelism == "fsdp":
                raise GptforgeError("LoRA runs train under DDP: use --parallelism=ddp")
            lora = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": cfg.targets(),
                    "dropout": cfg.lora_dropout}
            apply_lora(model, lora["rank"], lora["alpha"], lora["targets"], lora["dropout"])
    if lora is not None:
        report = trainable_report(model)
        say(f"LoRA rank {lora['rank']} on {', '.join(lora['targets'])}: {report['trainable_params']:,} of "
            f"{report['total_params']:,} parameters train; optimizer state "
            f"{report['optimizer_state_bytes'] / 2**20:.2f} MiB (full finetuning: "
            f"{report['full_finetune_optimizer_state_bytes'] / 2**20:.2f} MiB)")
    block_size = min(cfg.block_size, model.config.block_size)
    # the run's config records the model it really trains
    cfg = dataclasses.replace(cfg, block_size=block_size,
                              **{k: getattr(model.config, k) for k in MODEL_KEYS if k != "block_size"})
    data = conversations(cfg, tokenizer, template, say)
    extra = {"sft": sft_state, **({"lora": lora} if lora is not None else {})}
    return Trainer(cfg, d, data=data, model=model, extra=extra)


def base_model(cfg: SFTConfig, mirror, say) -> tuple[GPT, Tokenizer, ChatTemplate, dict]:
    """The base named by `init_from` with its tokenizer, the template on that tokenizer, rows grown where the
    model lacks them, cropped to `block_size`; and what the run records of its base."""
    source = load_source(cfg.init_from, mirror=mirror)
    model, tokenizer = source.model, source.tokenizer
    if isinstance(tokenizer, ChatTokenizer):  # an assistant finetuned again: its template is kept below
        tokenizer = tokenizer.base
    model.set_dropout(cfg.dropout)
    template = source.chat_template or ChatTemplate.for_tokenizer(tokenizer)
    state = {"base": cfg.init_from, "base_sha256": base_fingerprint(model.state_dict()), "grown_rows": None}
    if model.config.vocab_size < template.vocab_size:
        old = model.config.vocab_size
        torch.manual_seed(cfg.seed)
        state["grown_rows"] = model.resize_vocab(template.vocab_size)
        say(f"the chat template's markers need ids {template.system}..{template.end}: the {old}-row "
            f"embedding grows to {template.vocab_size} rows")
    if cfg.block_size < model.config.block_size:
        model.crop_block_size(cfg.block_size)
    return model, tokenizer, template, state


def conversations(cfg: SFTConfig, tokenizer: Tokenizer, template: ChatTemplate, say) -> ConversationData:
    """The train and val conversations, rendered; how many were too long is said, not hidden."""
    train = Conversations.read(cfg.data, tokenizer, template, cfg.block_size)
    if cfg.val_data:
        val = Conversations.read(cfg.val_data, tokenizer, template, cfg.block_size)
    else:
        train, val = train.split(cfg.val_fraction, cfg.seed)
    for name, split in (("train", train), ("val", val)):
        if split.dropped:
            say(f"{split.dropped} {name} conversation(s) longer than block_size={cfg.block_size} dropped")
    say(f"conversations: {len(train):,} train, {len(val):,} val, "
        f"{int(train.n_targets.sum()):,} train targets")
    return ConversationData(train, val, tokenizer, template)
