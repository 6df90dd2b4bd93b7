"""Tests for gptforge.train: exact resume (stop/resume, SIGTERM, kill -9), metrics, best checkpoint, bad
input.

    .venv/bin/python -m pytest tests/test_train.py

Every run is a tiny char-level model on a small generated corpus, so a run takes well under a second per
hundred steps on a CPU. Exactness is bit-for-bit: the losses of a resumed run are compared with `==`.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptforge import GPT, GPTConfig
from gptforge.checkpoint import load_checkpoint
from gptforge.config import TrainConfig
from gptforge.data.prepare import TextOptions, prepare_text
from gptforge.distributed import Dist
from gptforge.errors import GptforgeError
from gptforge.metrics import read_metrics
from gptforge.train import Trainer, run_config, train

TINY = dict(
    dataset="corpus", n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=4,
    gradient_accumulation_steps=2, eval_interval=10, eval_iters=4, log_interval=1, compile=False,
    warmup_iters=5, lr_decay_iters=40, learning_rate=3e-3, dropout=0.1, device="cpu", dtype="float32",
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """A char-level dataset of a few thousand characters of varied text."""
    root = tmp_path_factory.mktemp("data")
    words = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "and", "runs", "away",
             "home"]
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8 + i % 5)) + "."
             for i in range(400)]
    (root / "corpus.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_text(TextOptions(input=str(root / "corpus.txt"), data_dir=str(root), name="corpus",
                             tokenizer="char"))
    return root


def config(data_dir: Path, out_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "data_dir": str(data_dir), "out_dir": str(out_dir), **overrides})


def step_losses(out_dir: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in read_metrics(out_dir / "metrics.jsonl") if "loss" in r}


def eval_records(out_dir: Path) -> list[dict]:
    return [r for r in read_metrics(out_dir / "metrics.jsonl") if "val_loss" in r]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptforge", *args], capture_output=True, text=True,
                          timeout=timeout)


def cli_args(cfg: TrainConfig) -> list[str]:
    return [f"--{k}={v}" for k, v in dataclasses.asdict(cfg).items()]


def test_training_lowers_the_loss_and_logs_every_step(data_dir, tmp_path):
    progress = train(config(data_dir, tmp_path, max_iters=30))
    assert progress.iter_num == 30
    losses = step_losses(tmp_path)
    assert sorted(losses) == list(range(30))
    evals = eval_records(tmp_path)
    assert [r["iter"] for r in evals] == [0, 10, 20, 30]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    record = read_metrics(tmp_path / "metrics.jsonl")[1]
    assert set(record) >= {"iter", "loss", "lr", "dt_ms", "tokens_per_sec", "elapsed_s"}
    assert record["lr"] == pytest.approx(3e-3 * 1 / 6)  # warm-up: lr * (it + 1) / (warmup_iters + 1)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["max_iters"] == 30 and saved["device"] == "cpu"


def test_best_checkpoint_keeps_the_lowest_val_loss(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=30, learning_rate=3e-2, warmup_iters=0))
    best = load_checkpoint(tmp_path, which="best")
    latest = load_checkpoint(tmp_path, which="latest")
    val = {r["iter"]: r["val_loss"] for r in eval_records(tmp_path)}
    assert best["best_val_loss"] == min(val.values())
    assert best["iter_num"] == min((v, k) for k, v in val.items() if k > 0)[1]
    assert latest["iter_num"] == 30


MODERN = dict(optimizer="muon", pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True,
              tie_embeddings=False, logit_softcap=15.0, zero_init_proj=True, lr_schedule="wsd", muon_lr=0.05)


@pytest.mark.parametrize("options", [{}, MODERN], ids=["gpt2-adamw", "modern-muon"])
def test_stop_and_resume_is_bit_identical(data_dir, tmp_path, monkeypatch, options):
    whole, part = tmp_path / "whole", tmp_path / "part"
    train(config(data_dir, whole, max_iters=40, **options))
    real_step = Trainer.step

    def interrupted(self):  # Ctrl-C during step 22: the loop finishes it, checkpoints at 23 and stops
        if self.progress.iter_num == 22:
            signal.raise_signal(signal.SIGINT)
        return real_step(self)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "step", interrupted)
        assert train(config(data_dir, part, max_iters=40, **options)).iter_num == 23
    assert load_checkpoint(part)["iter_num"] == 23
    # everything comes from the saved config
    resumed = run_config([], {"init_from": "resume", "out_dir": str(part)})
    assert resumed.dropout == 0.1 and resumed.n_embd == 32
    train(resumed)
    assert step_losses(part) == step_losses(whole)
    assert [r["val_loss"] for r in eval_records(part)] == [r["val_loss"] for r in eval_records(whole)]
    a, b = load_checkpoint(whole), load_checkpoint(part)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def wait_for(predicate, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def latest_step(out_dir: Path) -> int:
    path = out_dir / "metrics.jsonl"
    losses = step_losses(out_dir) if path.is_file() else {}
    return max(losses, default=-1)


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory) -> Path:
    whole = tmp_path_factory.mktemp("whole")
    train(config(data_dir, whole, max_iters=100))
    return whole


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigterm", "kill-9"])
def test_interrupted_run_resumes_bit_identical(data_dir, uninterrupted, tmp_path, how):
    """SIGTERM checkpoints and exits; kill -9 at an arbitrary step loses only the steps since the last
    checkpoint. Either way the resumed run's whole history equals an uninterrupted run's."""
    whole, cut = uninterrupted, tmp_path / "cut"
    cfg = config(data_dir, cut, max_iters=100)
    process = subprocess.Popen([sys.executable, "-m", "gptforge", "train", *cli_args(cfg)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: latest_step(cut) >= 37, process)
    if how == "sigterm":
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        stopped_at = load_checkpoint(cut)["iter_num"]
        assert stopped_at > 37  # the checkpoint is where it stopped, not the last eval
    else:
        process.kill()
        process.wait(timeout=60)
        with open(cut / "metrics.jsonl", "a") as f:
            f.write('{"iter": 999, "lo')  # a torn last line, as a crash mid-write leaves
        assert load_checkpoint(cut)["iter_num"] % 10 == 0  # the last eval's checkpoint
    result = cli("train", "--init_from=resume", f"--out_dir={cut}")
    assert result.returncode == 0, result.stderr
    assert step_losses(cut) == step_losses(whole)
    assert [r["iter"] for r in eval_records(cut)] == [r["iter"] for r in eval_records(whole)]
    assert [r["val_loss"] for r in eval_records(cut)] == [r["val_loss"] for r in eval_records(whole)]


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(data_dir, tmp_path, monkeypatch):
    train(config(data_dir, tmp_path, max_iters=10))
    before = (tmp_path / "ckpt.pt").read_bytes()
    real_step = Trainer.step

    def poisoned(self):
        loss = real_step(self)
        return loss * float("nan") if self.progress.iter_num >= 13 else loss

    monkeypatch.setattr(Trainer, "step", poisoned)
    with pytest.raises(GptforgeError, match="loss became nan at iter 13"):
        train(run_config([], {"init_from": "resume", "out_dir": str(tmp_path), "max_iters": "20"}))
    assert (tmp_path / "ckpt.pt").read_bytes() == before


def test_resume_with_another_shape_names_the_keys(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=10))
    cfg = run_config([], {"init_from": "resume", "out_dir": str(tmp_path), "n_embd": "64", "n_layer": "3"})
    with pytest.raises(GptforgeError, match=r"changes the model shape \(n_layer 2 -> 3, n_embd 32 -> 64\)"):
        train(cfg)


def test_accumulation_steps_must_divide_over_the_processes(data_dir, tmp_path):
    with pytest.raises(GptforgeError, match="not divisible by the 2 processes"):
        Trainer(config(data_dir, tmp_path, gradient_accumulation_steps=3), Dist(world_size=2))


def test_eval_only_writes_no_checkpoint(data_dir, tmp_path):
    train(config(data_dir, tmp_path, eval_only=True))
    assert [r["iter"] for r in eval_records(tmp_path)] == [0]
    assert not (tmp_path / "ckpt.pt").exists()


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (None, ["--dataset=missing"], "no dataset at"),
        (None, ["--max_itres=5"], "unknown option --max_itres (did you mean --max_iters?)"),
        (None, ["--max_iters=lots"], "--max_iters='lots' is not an integer"),
        (None, ["--init_from=resume"], "no checkpoint at"),
        ("truncate", ["--init_from=resume"], "is not a readable checkpoint"),
    ],
)
def test_bad_input_is_one_line_and_keeps_the_run(data_dir, tmp_path, setup, args, message):
    cfg = config(data_dir, tmp_path / "run", max_iters=10)
    if setup == "truncate":
        train(cfg)
        latest = tmp_path / "run" / "ckpt.pt"
        data = latest.read_bytes()
        latest.unlink()  # best.pt may be a hard link to the same file: replace, not truncate in place
        latest.write_bytes(data[: len(data) // 2])
        best = (tmp_path / "run" / "best.pt").read_bytes()
    result = cli("train", *cli_args(cfg), *args)
    assert result.returncode == 2
    assert message in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    if setup == "truncate":
        assert (tmp_path / "run" / "best.pt").read_bytes() == best
        assert load_checkpoint(tmp_path / "run", which="best")["iter_num"] == 10
    elif "resume" not in " ".join(args):
        assert not (tmp_path / "run" / "ckpt.pt").exists()


def test_keep_last_prunes_old_checkpoints(data_dir, tmp_path):
    train(config(data_dir, tmp_path, max_iters=40, keep_last=2))
    kept = sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))
    assert kept == ["ckpt-00000020.pt", "ckpt-00000030.pt", "ckpt-00000040.pt"]
    assert load_checkpoint(tmp_path / "ckpt-00000030.pt")["iter_num"] == 30
    assert os.path.samefile(tmp_path / "ckpt.pt", tmp_path / "ckpt-00000040.pt")


def test_finetune_from_a_local_hf_directory_crops_and_resumes(data_dir, tmp_path):
    from test_hf import tiny_hf

    tiny_hf(n_positions=128).save_pretrained(tmp_path / "hf")
    out = tmp_path / "ft"
    cfg = config(data_dir, out, init_from=str(tmp_path / "hf"), max_iters=10, n_layer=12, n_embd=768)
    train(cfg)
    saved = json.loads((out / "config.json").read_text())
    ckpt = load_checkpoint(out)
    assert ckpt["model_args"]["block_size"] == 32  # cropped from 128 to the run's block_size
    assert (saved["n_layer"], saved["n_embd"]) == (
        ckpt["model_args"]["n_layer"], ckpt["model_args"]["n_embd"])
    evals = eval_records(out)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    train(run_config([], {"init_from": "resume", "out_dir": str(out), "max_iters": "20"}))
    assert max(step_losses(out)) == 19


def test_resuming_a_finished_run_changes_nothing(data_dir, tmp_path, capsys):
    train(config(data_dir, tmp_path, max_iters=10))
    history = (tmp_path / "metrics.jsonl").read_text()
    for max_iters in ("10", "5"):
        assert train(run_config([], {"init_from": "resume", "out_dir": str(tmp_path),
                                     "max_iters": max_iters})).iter_num == 10
        assert "already at iter 10" in capsys.readouterr().out  # tqdm.write prints to stdout
    assert (tmp_path / "metrics.jsonl").read_text() == history


def nanogpt_checkpoint(data_dir: Path, out_dir: Path, iter_num: int = 5) -> GPT:
    """What nanoGPT's train.py saves: its model (compiled: `_orig_mod.` keys), AdamW's plain state dict, its
    model_args (no gptforge keys), iter_num, best_val_loss (a tensor) and its config dict. Returns the
    model."""
    vocab = json.loads((data_dir / "corpus" / "meta.json").read_text())["vocab_size"]
    model_args = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, bias=False, vocab_size=vocab,
                      dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**model_args, gelu_approximate="none"))
    optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.99), "cpu")
    x = torch.randint(0, vocab, (2, 32))
    model(x, x)[1].backward()
    optimizer.step()
    nanogpt_config = {"out_dir": str(out_dir), "dataset": "corpus", "batch_size": 4, "block_size": 32,
                      "gradient_accumulation_steps": 1, "n_layer": 2, "n_head": 2, "n_embd": 32,
                      "dropout": 0.0, "bias": False, "learning_rate": 1e-3, "max_iters": iter_num,
                      "device": "cpu", "compile": False, "eval_interval": 5, "eval_iters": 2,
                      "dtype": "float32", "init_from": "scratch"}
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in model.state_dict().items()},
                "optimizer": optimizer.state_dict(), "model_args": model_args, "iter_num": iter_num,
                "best_val_loss": torch.tensor(3.5), "config": nanogpt_config}, out_dir / "ckpt.pt")
    return model


def test_a_nanogpt_run_resumes_with_its_weights_and_adamw_state(data_dir, tmp_path, capsys):
    saved = nanogpt_checkpoint(data_dir, tmp_path)
    cfg = run_config([], {"init_from": "resume", "out_dir": str(tmp_path), "max_iters": "8",
                          "data_dir": str(data_dir)})
    assert cfg.gelu_approximate == "none" and cfg.n_embd == 32  # nanoGPT's model: its exact GELU
    trainer = Trainer(cfg, Dist())
    assert trainer.progress.iter_num == 5 and trainer.progress.best_val_loss == pytest.approx(3.5)
    state = trainer.raw.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.state_dict().items())
    assert all(s["step"] == 1 for s in trainer.optimizer.state.values())  # AdamW's moments came along
    assert "resuming nanoGPT's run at iter 5: its weights and AdamW state" in capsys.readouterr().out
    trainer.batches.close()
    assert train(cfg).iter_num == 8  # and it trains on


def test_a_val_split_shorter_than_a_row_fails_before_any_work(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    (root / "tiny.txt").write_text("abcdefghij" * 300, encoding="utf-8")
    prepare_text(TextOptions(input=str(root / "tiny.txt"), data_dir=str(root), name="tiny", tokenizer="char",
                             val_fraction=0.01))
    cfg = TrainConfig(**{**TINY, "dataset": "tiny", "data_dir": str(root), "out_dir": str(tmp_path / "run"),
                         "block_size": 64})
    with pytest.raises(GptforgeError, match=r"the val split has 30 tokens, fewer than block_size \+ 1 = 65"):
        Trainer(cfg, Dist())
