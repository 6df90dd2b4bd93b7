"""Tests for distributed training through torchrun: 2 gloo processes on the CPU against 1 process.

    .venv/bin/python -m pytest tests/test_distributed.py

The global batch of a step does not depend on the world size, so 2 processes with 1 micro-step each must
log the losses of 1 process with 2 micro-steps (up to float rounding of the gradient all-reduce).
"""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from test_train import cli_args, config, data_dir, eval_records, step_losses  # noqa: F401 (fixture)

from gptforge.checkpoint import load_checkpoint
from gptforge.train import train

pytestmark = pytest.mark.slow


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "gptforge", "train", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def assert_close_history(a: Path, b: Path, tol: float = 1e-5) -> None:
    la, lb = step_losses(a), step_losses(b)
    assert sorted(la) == sorted(lb) and la
    assert max(abs(la[k] - lb[k]) for k in la) < tol
    va, vb = eval_records(a), eval_records(b)
    assert [r["iter"] for r in va] == [r["iter"] for r in vb]
    assert max(abs(x["val_loss"] - y["val_loss"]) for x, y in zip(va, vb, strict=True)) < tol


@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_two_processes_match_one(data_dir, tmp_path, parallelism):  # noqa: F811
    single, multi = tmp_path / "single", tmp_path / "multi"
    cfg = config(data_dir, single, max_iters=10, eval_interval=5, dropout=0.0)
    train(cfg)
    result = torchrun(*cli_args(dataclasses.replace(cfg, out_dir=str(multi), parallelism=parallelism)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_close_history(single, multi)
    assert load_checkpoint(multi)["iter_num"] == 10


def test_fsdp_resumes_where_it_stopped(data_dir, tmp_path):  # noqa: F811
    whole, part = tmp_path / "whole", tmp_path / "part"
    cfg = config(data_dir, whole, max_iters=10, eval_interval=5, parallelism="fsdp")
    assert torchrun(*cli_args(cfg)).returncode == 0
    result = torchrun(*cli_args(dataclasses.replace(cfg, out_dir=str(part), max_iters=5)))
    assert result.returncode == 0, result.stderr[-3000:]
    result = torchrun("--init_from=resume", f"--out_dir={part}", "--max_iters=10")
    assert result.returncode == 0, result.stderr[-3000:]
    assert step_losses(part) == step_losses(whole)  # same processes, same RNG streams: bit-identical


def test_indivisible_accumulation_is_a_clear_error(data_dir, tmp_path):  # noqa: F811
    cfg = config(data_dir, tmp_path, max_iters=4, gradient_accumulation_steps=3)
    result = torchrun(*cli_args(cfg))
    assert result.returncode != 0
    assert "--gradient_accumulation_steps=3 is not divisible by the 2 processes" in result.stderr
    # each rank's one-line error, not its traceback (torchrun's own launcher still reports the failed
    # children)
    assert "gptforge/train.py" not in result.stderr
