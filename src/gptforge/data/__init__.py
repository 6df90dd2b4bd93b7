"""The data side: text → tokenizer → `.bin` + `meta.json` → batches, one module per step.

- `corpus.py`: where text comes from (a text file, documents, a Hugging Face dataset), streamed in chunks.
- `prepare.py`: `gptforge prepare`: the dataset registry and recipes, and the writer that tokenizes a corpus
  into token files.
- `files.py`: the token-file format (`train.bin`, `val.bin`, `meta.json`) and one split, memory-mapped.
- `batches.py`: the deterministic, resumable batches training draws from a split (or a weighted mixture of
  splits).
- `mixture.py`: `--data_mix`, several datasets of one tokenizer mixed by weight.
- `eval_sets.py`: the evaluation sets' files (HellaSwag, LAMBADA, WikiText-2), apart from the token files.

Data flows one way, corpus → prepare → files → batches, and no module reaches back up it: prepare.py uses
corpus.py and files.py (the format it writes), batches.py uses files.py, mixture.py both, and corpus.py,
files.py and eval_sets.py use no other module of the package. This file re-exports what readers of prepared
data need (files and batches) and imports neither corpus.py nor prepare.py, so reading prepared data never
loads the writing side. Both load on first use (PEP 562), so the writing side, which needs no torch, runs
without importing it.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gptforge.data.batches import Batches, BatchSampler, TokenData, shuffle_index
    from gptforge.data.files import META_FILE, SPLITS, Meta, TokenDataset, token_dtype

_HOMES = {"batches": ("Batches", "BatchSampler", "TokenData", "shuffle_index"),
          "files": ("META_FILE", "SPLITS", "Meta", "TokenDataset", "token_dtype")}

__all__ = [
    "META_FILE",
    "SPLITS",
    "BatchSampler",
    "Batches",
    "Meta",
    "TokenData",
    "TokenDataset",
    "shuffle_index",
    "token_dtype",
]


def __getattr__(name: str) -> Any:
    import importlib

    for module, names in _HOMES.items():
        if name in names:
            return getattr(importlib.import_module(f"gptforge.data.{module}"), name)
    raise AttributeError(f"module 'gptforge.data' has no attribute {name!r}")
