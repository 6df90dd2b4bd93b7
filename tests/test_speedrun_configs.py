"""The speedrun presets (configs/speedrun_*.toml): they load, and their options train a tiny model on the CPU.

    .venv/bin/python -m pytest tests/test_speedrun_configs.py
"""

import dataclasses
from pathlib import Path

import pytest
from tiny_run import char_dataset

from gptforge.config import TrainConfig, load_train_config
from gptforge.metrics import read_metrics
from gptforge.train import train

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = ["speedrun_shakespeare_char_cpu.toml", "speedrun_gpt2.toml"]
# keys of a preset replaced for the tiny run: shape, data, length, device; every other option is the preset's
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, gradient_accumulation_steps=1,
            max_iters=30, lr_decay_iters=30, warmup_iters=0, eval_interval=30, eval_iters=4, log_interval=1,
            device="cpu", compile=False, wandb_log=False)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads(name):
    cfg = load_train_config([str(CONFIGS / name)], {})
    defaults = TrainConfig()
    assert cfg.optimizer == "muon" and cfg.lr_schedule == "wsd"
    assert (cfg.pos_emb, cfg.mlp, cfg.qk_norm, cfg.tie_embeddings) != (
        defaults.pos_emb, defaults.mlp, False, True
    )


def test_gpt2_preset_follows_the_speedrun():
    cfg = load_train_config([str(CONFIGS / "speedrun_gpt2.toml")], {})
    assert cfg.dataset == "openwebtext" and cfg.dtype == "bfloat16" and cfg.compile
    assert (cfg.pos_emb, cfg.mlp, cfg.qk_norm, cfg.tie_embeddings) == ("rope", "relu2", True, False)
    assert cfg.logit_softcap and cfg.zero_init_proj
    assert cfg.embed_lr is not None and cfg.head_lr is not None
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size) == (12, 768, 1024)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_options_train_a_tiny_model(name, tmp_path):
    """The preset's options on a 2-layer, 32-wide shape: 30 steps on a small char corpus lower the loss."""
    data_dir = tmp_path / "data"
    char_dataset(data_dir)
    preset = load_train_config([str(CONFIGS / name)], {})
    cfg = dataclasses.replace(
        preset, **TINY, dataset="sonnet", data_dir=str(data_dir), out_dir=str(tmp_path / "run")
    )
    assert train(cfg).iter_num == 30
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert evals[-1] < evals[0] - 0.5
