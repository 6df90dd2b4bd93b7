"""End to end: `gptforge prepare` on the command line,
then training batches read back and decoded to the text.

.venv/bin/python -m pytest tests/test_e2e_data.py
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from mirror_data import MIRROR, SHAKESPEARE, WAR_AND_PEACE, needs_mirror

from gptforge.data import Batches, Meta, TokenDataset


@pytest.mark.slow
@needs_mirror
@pytest.mark.parametrize(
    ("source", "args"),
    [
        (SHAKESPEARE, ["shakespeare_char"]),
        (
            WAR_AND_PEACE,
            ["text", f"--input={WAR_AND_PEACE}", "--tokenizer=bpe", "--vocab_size=2048", "--name=wp"],
        ),
    ],
)
def test_prepared_batches_decode_to_the_source_text(tmp_path, source, args):
    env = {**os.environ, "GPTFORGE_DATA_MIRROR": str(MIRROR)}
    command = [sys.executable, "-m", "gptforge", "prepare", *args, f"--data_dir={tmp_path}"]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    out = next(p for p in tmp_path.iterdir() if p.is_dir())
    meta = Meta.read(out)
    tokenizer = meta.load_tokenizer(out)
    text = source.read_bytes().decode("utf-8")
    train_text = tokenizer.decode(np.fromfile(out / "train.bin", dtype=meta.dtype))
    assert text.startswith(train_text) and len(train_text) == int(len(text) * 0.9)
    with TokenDataset(out, "val", meta) as val:
        x, y = Batches(val, block_size=256, batch_size=8, seed=7).get(0)
    for row in [*x.tolist(), *y.tolist()]:
        # a window may start or end inside a multi-byte character; the rest is the source text verbatim
        assert tokenizer.decode(row).strip("\ufffd") in text
