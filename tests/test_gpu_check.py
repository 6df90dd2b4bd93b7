"""Tests for benchmarks/gpu_check.py, the one-shot GPU check: its whole flow with `--device=cpu --tiny`, and
gptforge's training side importing without the serving packages (the GPU machine has neither).

    .venv/bin/python -m pytest tests/test_gpu_check.py
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.py"


def test_training_and_reading_import_without_fastapi_and_uvicorn(tmp_path):
    result = tmp_path / "imports.json"
    subprocess.run([sys.executable, str(SCRIPT), "--stage=imports", f"--result={result}",
                    f"--out={tmp_path}"], check=True, timeout=120)
    stage = json.loads(result.read_text())
    assert stage["status"] == "pass", stage["note"]


@pytest.mark.slow
def test_the_tiny_check_runs_every_stage_on_a_cpu_and_writes_its_report(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--device=cpu", "--tiny", f"--out={tmp_path}"],
                         capture_output=True, text=True, timeout=170)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in report["stages"]}
    assert list(stages) == ["environment", "imports", "cuda tests", "train b=2", "decode", "train b=4",
                            "speedrun"]
    failed = {name: s["note"] for name, s in stages.items() if s["status"] == "fail"}
    assert not failed
    assert stages["cuda tests"]["status"] in ("pass", "skip")  # skipped without CUDA, with the reason
    for name in ("train b=2", "train b=4", "speedrun"):
        numbers = stages[name]["numbers"]
        assert numbers["tokens_per_s"] > 0 and numbers["planned_gib"] > 0 and numbers["mfu_pct"] > 0
    assert stages["decode"]["numbers"]["b4_tokens_per_s"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| stage | result | numbers | seconds |" in table
    assert all(f"| {name} | {stage['status']}" in table for name, stage in stages.items())
