"""Where the data tests find the offline mirror of public files ($GPTFORGE_DATA_MIRROR, else ../shared/data),
and tiktoken's own GPT-2 encoding fed from it: the independent reference the tests compare gptforge
against."""

import functools
import os
import tempfile
from pathlib import Path

import pytest
import tiktoken

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("GPTFORGE_DATA_MIRROR") or REPO.parent / "shared" / "data").resolve()
SHAKESPEARE = MIRROR / "tinyshakespeare" / "input.txt"
WAR_AND_PEACE = MIRROR / "gutenberg" / "war_and_peace_pg2600.txt"
needs_mirror = pytest.mark.skipif(
    not (SHAKESPEARE.is_file() and (MIRROR / "gpt2" / "vocab.bpe").is_file()),
    reason=f"no data mirror at {MIRROR}",
)

# tiktoken looks for cached downloads under sha1(url) in $TIKTOKEN_CACHE_DIR (the mirror README's recipe).
_TIKTOKEN_CACHE_NAMES = {
    "6d1cbeee0f20b3d9449abfede4726ed8212e3aee": "gpt2/vocab.bpe",
    "6c7ea1a7e38e3a7f062df639a5b80947f075ffe6": "gpt2/encoder.json",
}


@functools.cache
def reference_gpt2() -> tiktoken.Encoding:
    """`tiktoken.get_encoding("gpt2")` exactly as nanoGPT calls it,
    served from the mirror instead of the network."""
    with tempfile.TemporaryDirectory() as cache, pytest.MonkeyPatch.context() as patch:
        for name, path in _TIKTOKEN_CACHE_NAMES.items():
            (Path(cache) / name).symlink_to(MIRROR / path)
        patch.setenv("TIKTOKEN_CACHE_DIR", cache)
        return tiktoken.get_encoding("gpt2")
