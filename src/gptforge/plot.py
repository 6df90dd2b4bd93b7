"""`gptforge plot OUT_DIR`: a run's loss curves from its metrics.jsonl, drawn to a PNG.

Reads only the metrics file (metrics.py owns its format), so it works on a finished run, a running one or one
copied off a cluster. matplotlib is an optional dependency (`pip install 'gptforge[plot]'`), imported only
here and with the Agg backend: no display is needed.
"""

import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gptforge.atomic import atomic_write_bytes
from gptforge.errors import GptforgeError
from gptforge.metrics import METRICS_NAME, read_metrics

PLOT_NAME = "loss.png"


@dataclass
class PlotOptions:
    to: str | None = field(
        default=None, metadata={"help": f"the PNG to write (default: OUT_DIR/{PLOT_NAME})"}
    )


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise GptforgeError("gptforge plot needs matplotlib: pip install 'gptforge[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot(out_dir: str | Path, opts: PlotOptions | None = None) -> Path:
    """Draw the run's loss curves to `opts.to` (default OUT_DIR/loss.png); returns the PNG's path."""
    opts = opts or PlotOptions()
    out_dir = Path(out_dir)
    path = out_dir / METRICS_NAME
    if not path.is_file():
        raise GptforgeError(f"{path} does not exist: OUT_DIR must be a gptforge train --out_dir")
    fig = loss_figure(read_metrics(path), out_dir.resolve().name)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    _pyplot().close(fig)
    to = Path(opts.to) if opts.to else out_dir / PLOT_NAME
    atomic_write_bytes(to, buffer.getvalue())
    return to


def loss_figure(records: list[dict[str, Any]], name: str) -> Any:
    """A matplotlib figure: the training loss of every logged step, the train/val loss of every eval."""
    steps = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("val_loss") is not None]
    if not steps and not evals:
        raise GptforgeError(f"run {name} has logged no loss yet; plot again once it has")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5), dpi=120)
    title = name
    if steps:
        ax.plot([r["iter"] for r in steps], [r["loss"] for r in steps], color="tab:blue", alpha=0.35,
                linewidth=0.8, label="train loss (each step)")
    if evals:
        iters = [r["iter"] for r in evals]
        ax.plot(iters, [r["train_loss"] for r in evals], "o-", color="tab:blue", markersize=3,
                label="eval: train")
        ax.plot(iters, [r["val_loss"] for r in evals], "o-", color="tab:orange", markersize=3,
                label="eval: val")
        best = min(evals, key=lambda r: r["val_loss"])
        title += f": best val loss {best['val_loss']:.4f} at iter {best['iter']}"
    ax.set_title(title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("iter")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig
