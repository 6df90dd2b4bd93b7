"""The run's history: `out_dir/metrics.jsonl`, one JSON object per logged step or eval.

Each record is one flushed write, floats at full precision. A resumed run first cuts the file back to the
checkpoint's iteration (dropping a torn last line a crash may have left), so the file always tells one
consistent history.
"""

import json
from pathlib import Path
from typing import Any

from gptforge.atomic import atomic_write_text

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The complete records of a metrics file; a torn (partial) line is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class MetricsLog:
    """Appends records to `out_dir/metrics.jsonl`:
    fresh for a new run, cut back to `resume_iter` on resume."""

    def __init__(self, out_dir: str | Path, resume_iter: int | None = None):
        self.path = Path(out_dir) / METRICS_NAME
        kept = []
        if resume_iter is not None and self.path.is_file():
            # steps before the checkpoint, and the eval taken right before it was written
            kept = [r for r in read_metrics(self.path)
                    if r["iter"] < resume_iter or (r["iter"] == resume_iter and "val_loss" in r)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (open for the run's lifetime)

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
