"""Tests for gptforge.cli: dispatch, help and one-line errors, over a table of bad command lines (devices the
machine lacks, paths that cannot be written, broken and malicious model files, other parsers' habits, more
memory than there is).

    .venv/bin/python -m pytest tests/test_cli.py
"""

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_run import tiny_run

from gptforge import GPT, GPTConfig
from gptforge.cli import main


def test_help_lists_commands(capsys):
    assert main(["--help"]) == 0
    assert "usage: gptforge COMMAND" in capsys.readouterr().out


def test_unknown_command_is_a_one_line_error(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge: error: unknown command 'trian'") and err.count("\n") == 1


def test_python_dash_m_runs_the_cli():
    result = subprocess.run([sys.executable, "-m", "gptforge", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: gptforge" in result.stdout


# -- a table of bad command lines: each is one line on stderr naming the cause, exit status 2, and nothing
# -- already written is changed

def copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("cli"))


def broken(kind: str, run: Path, tmp: Path) -> Path:
    """A model directory or run broken in one way: what users' disks and downloads really hold."""
    if kind in ("empty", "garbage", "plain_pickle", "mismatch"):
        path = copy_run(run, tmp / kind)
        (path / "best.pt").unlink()
        latest = path / "ckpt.pt"
        if kind == "empty":
            latest.write_bytes(b"")
        elif kind == "garbage":
            latest.write_bytes(os.urandom(4096))
        elif kind == "plain_pickle":
            latest.write_bytes(pickle.dumps({"model_args": {}, "model": {}}))
        else:  # the config says a wider model than the tensors hold
            ckpt = torch.load(latest, weights_only=True)
            ckpt["model_args"]["n_embd"] *= 2
            torch.save(ckpt, latest)
        return path
    hf = tmp / kind
    GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=50257)).to_hf(hf)
    if kind == "hf_truncated":
        data = (hf / "model.safetensors").read_bytes()
        (hf / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif kind == "hf_pickle":
        (hf / "model.safetensors").unlink()
        (hf / "pytorch_model.bin").write_bytes(pickle.dumps(Exploit()))
    elif kind == "hf_config":
        (hf / "config.json").write_text("{not json", encoding="utf-8")
    return hf


class Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
BAD_COMMAND_LINES = [
    # devices the machine lacks, or that torch does not know
    pytest.param("train --device=cuda", "--device=cuda: ", marks=NO_CUDA),
    pytest.param("sample --out_dir={run} --device=cuda:1", "--device=cuda:1: ", marks=NO_CUDA),
    pytest.param("eval --out_dir={run} --device=cuda", "--device=cuda: ", marks=NO_CUDA),
    pytest.param("bench --device=cuda --steps=1 --burn_in=0", "--device=cuda: ", marks=NO_CUDA),
    ("sample --out_dir={run} --device=mps", "--device=mps: Apple's MPS is not available"),
    ("train --device=tpu", "--device='tpu' is not a device gptforge runs on"),
    ("sample --out_dir={run} --device=gpu0", "--device='gpu0' is not a device gptforge runs on"),
    # paths that cannot be written
    ("train --dataset=sonnet --data_dir={data} --out_dir={file}", "--out_dir={file} is a file"),
    ("train --dataset=sonnet --data_dir={data} --out_dir={file}/run", "cannot be created: {file} is a file"),
    ("export --out_dir={run} --to={file}/hf", "--to={file}/hf cannot be created: {file} is a file"),
    ("export --out_dir={run} --to={file}", "--to={file} is a file"),
    ("eval --out_dir={run} --task=val --to={tmp}", "--to={tmp} is a directory"),
    ("prepare shakespeare_char --data_dir={file}", "--data_dir={file} is a file"),
    ("prepare text --input={file} --data_dir={file}/data", "--data_dir={file}/data cannot be created"),
    # broken model files: the cause named, never a traceback
    ("sample --out_dir={empty}", "is empty (0 bytes)"),
    ("sample --out_dir={garbage}", "neither torch.save's zip format nor its legacy one"),
    ("sample --out_dir={plain_pickle}", "not a readable checkpoint"),
    ("sample --out_dir={mismatch}", "the weights and the config do not belong together"),
    ("export --out_dir={mismatch} --to={tmp}/never", "the weights and the config do not belong together"),
    ("eval --out_dir={mismatch} --task=val", "the weights and the config do not belong together"),
    ("sample --init_from={hf_truncated}", "model.safetensors is not a readable safetensors file"),
    ("sample --init_from={hf_pickle}", "pytorch_model.bin is a pickle that names code to run"),
    ("sample --init_from={hf_config}", "config.json is not valid JSON"),
    # habits of other tools' parsers
    ("train --batch_size 8", "write --batch_size=8, not --batch_size 8"),
    ("sample --num_samples 3", "write --num_samples=3"),
    # more memory than the machine has: the size asked and the knobs to turn
    ("bench --n_layer=1 --n_head=1 --n_embd=4194304 --block_size=8 --batch_size=1 --steps=1 --burn_in=0",
     "out of main memory (it asked for"),
]


@pytest.mark.parametrize(("line", "message"), BAD_COMMAND_LINES)
def test_bad_command_lines_are_one_line_errors_and_write_nothing(run, tmp_path, capsys, line, message):
    file = tmp_path / "a-file"
    file.write_text("keep me", encoding="utf-8")
    names = {"run": run, "data": run.parent / "data", "file": file, "tmp": tmp_path}
    for kind in ("empty", "garbage", "plain_pickle", "mismatch", "hf_truncated", "hf_pickle", "hf_config"):
        if "{" + kind + "}" in line:
            names[kind] = broken(kind, run, tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(line.format(**names).split()) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert message.format(**names) in err, err
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before  # nothing written, nothing lost
    assert not Path("pwned").exists()


def test_a_bad_command_line_is_one_line_in_a_real_process(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "gptforge", "train", "--device=tpu", f"--out_dir={tmp_path}/o"],
        capture_output=True, text=True,
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == ("gptforge train: error: --device='tpu' is not a device gptforge runs on: use "
                             "cpu, cuda, cuda:N, mps or auto\n")
