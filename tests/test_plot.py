"""Tests for gptforge.plot: the curves drawn are the run's metrics, the PNG is written,
and problems are clear.

    .venv/bin/python -m pytest tests/test_plot.py
"""

import json
import sys

import pytest
from tiny_run import tiny_run

from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.metrics import read_metrics
from gptforge.plot import PlotOptions, loss_figure, plot

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("plot"))


def test_the_lines_are_the_run_s_metrics(run):
    records = read_metrics(run / "metrics.jsonl")
    fig = loss_figure(records, "run")
    ax = fig.axes[0]
    step, eval_train, eval_val = ax.get_lines()
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    assert len(steps) == 20 and [r["iter"] for r in evals] == [0, 10, 20]
    assert list(step.get_xdata()) == [r["iter"] for r in steps]
    assert list(step.get_ydata()) == [r["loss"] for r in steps]
    assert list(eval_train.get_ydata()) == [r["train_loss"] for r in evals]
    assert list(eval_val.get_xdata()) == [0, 10, 20]
    assert list(eval_val.get_ydata()) == [r["val_loss"] for r in evals]
    best = min(evals, key=lambda r: r["val_loss"])
    assert ax.get_title() == f"run: best val loss {best['val_loss']:.4f} at iter {best['iter']}"


def test_the_command_writes_a_png(run, tmp_path, capsys):
    assert main(["plot", str(run)]) == 0
    assert (run / "loss.png").read_bytes().startswith(PNG_MAGIC)
    assert main(["plot", str(run), f"--to={tmp_path / 'curves.png'}"]) == 0
    from PIL import Image

    with Image.open(tmp_path / "curves.png") as image:
        assert image.format == "PNG" and image.size == (1080, 600)
    assert f"wrote {tmp_path / 'curves.png'}" in capsys.readouterr().out


def test_a_torn_last_line_and_a_run_without_evals_still_plot(tmp_path):
    lines = [json.dumps({"iter": i, "loss": 4.0 - i / 10, "lr": 1e-3}) for i in range(5)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + '\n{"iter": 5, "lo')
    assert plot(tmp_path, PlotOptions()).read_bytes().startswith(PNG_MAGIC)
    assert len(loss_figure(read_metrics(tmp_path / "metrics.jsonl"), "x").axes[0].get_lines()) == 1


def test_missing_or_empty_metrics_are_one_line_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has logged no loss yet" in err and err.count("\n") == 1
    assert main(["plot"]) == 2
    assert "expected gptforge plot OUT_DIR" in capsys.readouterr().err


def test_without_matplotlib_the_error_says_how_to_install_it(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(GptforgeError, match=r"pip install 'gptforge\[plot\]'"):
        plot(run)
