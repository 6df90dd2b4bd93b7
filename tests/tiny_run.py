"""A tiny trained run for the tests of what reads runs (sample, export, plot, bench): a char dataset made
from a sonnet, and 20 steps of a 2-layer model on the CPU, about a second; and untrained models whose logits
differ clearly from token to token, for the exports' comparisons."""

from pathlib import Path

import torch

from gptforge import GPT, GPTConfig
from gptforge.config import TrainConfig
from gptforge.data.prepare import TextOptions, get_dataset
from gptforge.train import train

SONNET = """Shall I compare thee to a summer's day?
Thou art more lovely and more temperate:
Rough winds do shake the darling buds of May,
And summer's lease hath all too short a date;
Sometime too hot the eye of heaven shines,
And often is his gold complexion dimm'd;
And every fair from fair sometime declines,
By chance or nature's changing course untrimm'd;
But thy eternal summer shall not fade,
Nor lose possession of that fair thou ow'st;
Nor shall death brag thou wander'st in his shade,
When in eternal lines to time thou grow'st:
So long as men can breathe or eyes can see,
So long lives this, and this gives life to thee.
"""
DATASET = "sonnet"


def char_dataset(data_dir: Path) -> Path:
    """DATA_DIR/sonnet: the sonnet 20 times over, one token per character."""
    data_dir.mkdir(parents=True, exist_ok=True)
    source = data_dir / "sonnet.txt"
    source.write_text(SONNET * 20, encoding="utf-8")
    options = TextOptions(
        input=str(source), tokenizer="char", data_dir=str(data_dir), name=DATASET, num_proc=1
    )
    get_dataset("text").prepare(options)
    return data_dir / DATASET


def tiny_run(root: Path) -> Path:
    """Train the tiny run under `root`; returns its out_dir (ckpt.pt, best.pt, metrics.jsonl)."""
    char_dataset(root / "data")
    out_dir = root / "run"
    train(TrainConfig(
        dataset=DATASET, data_dir=str(root / "data"), out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=32,
        block_size=32, batch_size=4, gradient_accumulation_steps=1, max_iters=20, eval_interval=10,
        eval_iters=5, compile=False, warmup_iters=2, lr_decay_iters=20, device="cpu", dtype="float32",
    ))
    return out_dir


def jittered(config: GPTConfig, seed: int = 0) -> GPT:
    """A model with weights spread wide enough (and norms and biases off their init) that logits differ
    clearly from token to token, like a trained model's: greedy choices are not near-ties."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                p.uniform_(0.5, 1.5)
            elif p.dim() == 1:
                p.normal_(0.0, 0.05)
            else:
                p.normal_(0.0, 0.08)
    return model
