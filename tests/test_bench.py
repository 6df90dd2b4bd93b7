"""Tests for gptforge.bench: it times the trainer's step on random or real data, reports consistent numbers
and writes a profiler trace on request. Timings themselves are not asserted (this machine is noisy).

    .venv/bin/python -m pytest tests/test_bench.py
"""

import json
import math

import pytest
from tiny_run import char_dataset

from gptforge.bench import BenchOptions, bench
from gptforge.cli import main
from gptforge.options import apply_overrides

TINY = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "batch_size": 2, "burn_in": 1, "steps": 2,
        "compile": False, "device": "cpu", "dtype": "float32"}


def tiny(**overrides) -> BenchOptions:
    return apply_overrides(BenchOptions(), {**TINY, **overrides})


def test_random_data_numbers_are_consistent():
    result = bench(tiny(gradient_accumulation_steps=2))
    tokens_per_step = 2 * 16 * 2
    assert result.tokens_per_sec == pytest.approx(tokens_per_step / (result.ms_per_iter / 1000))
    assert result.ms_per_iter > 0 and result.median_ms > 0
    assert result.mfu is not None and 0 < result.mfu < 1  # CPU peak is measured, so MFU is known
    assert len(result.losses) == 2
    # an untrained model over uniform random GPT-2 ids: about ln(50304)
    assert all(abs(loss - math.log(50304)) < 1.0 for loss in result.losses)
    assert result.trace is None


def test_real_data_trains_on_the_dataset_s_vocabulary(tmp_path):
    char_dataset(tmp_path)
    meta = json.loads((tmp_path / "sonnet" / "meta.json").read_text())
    result = bench(tiny(dataset="sonnet", data_dir=str(tmp_path)))
    # a model sized to the dataset's few characters starts near ln(vocab), far below random GPT-2 ids
    assert all(abs(loss - math.log(meta["vocab_size"])) < 1.0 for loss in result.losses)


def test_profile_writes_a_chrome_trace(tmp_path):
    result = bench(tiny(profile=True, profile_dir=str(tmp_path / "trace")))
    assert result.trace is not None and result.trace.parent == tmp_path / "trace"
    events = json.loads(result.trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    assert any(name.startswith("aten::addmm") or name.startswith("aten::mm") for name in names)
    assert sum(name.startswith("ProfilerStep#") for name in names) == 2  # the timed steps only


def test_the_command_prints_the_summary(capsys):
    args = [f"--{k}={v}" for k, v in TINY.items()]
    assert main(["bench", *args]) == 0
    out = capsys.readouterr().out
    assert "time per iteration:" in out and "tokens/s" in out and "MFU" in out and "random tokens" in out


@pytest.mark.parametrize(("args", "message"), [
    (["--steps=0"], "--steps must be >= 1"),
    (["--dataset=missing", "--data_dir=/nonexistent"], "no dataset at /nonexistent/missing"),
    (["--n_embd=15"], "n_embd"),
])
def test_bad_options_are_one_line_errors(capsys, args, message):
    assert main(["bench", *[f"--{k}={v}" for k, v in TINY.items()], *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gptforge bench: error: ") and message in err and err.count("\n") == 1
