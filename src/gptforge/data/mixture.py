"""A weighted mixture of prepared datasets as training sees it: `--data_mix="fineweb:0.7,shakespeare:0.3"`.

Each name is a dataset under DATA_DIR (or a path, or a glob of llm.c shards, as `--dataset` takes them); the
weights are the shares of every global batch's rows that come from each (batches.Batches draws them). Every
source must share one tokenizer. Training logs the mixture's val loss and each source's own. This module
knows only how sources are named, opened and checked; how rows are drawn is batches.py's.
"""

from pathlib import Path
from typing import Any

from gptforge.data.batches import AlignRows, Batches, TokenData
from gptforge.data.files import locate
from gptforge.errors import GptforgeError


def parse_mix(spec: str) -> dict[str, float]:
    """`"fineweb:0.7,shakespeare:0.3"` as {name: weight}, in order; weights need not sum to 1."""
    mix: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, weight = item.strip().rpartition(":")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not sep or not name or not value > 0:
            raise GptforgeError(
                f"--data_mix item {item.strip()!r} is not NAME:WEIGHT with a positive weight "
                "(e.g. --data_mix=fineweb:0.7,shakespeare:0.3)"
            )
        if name in mix:
            raise GptforgeError(f"--data_mix names {name} twice")
        mix[name] = value
    return mix


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two meta.json tokenizer specs are one tokenizer (GPT-2's is GPT-2's, however it is spelled)."""
    return a == b or a.get("kind") == b.get("kind") == "gpt2"


class Mixture:
    """The sources of a `--data_mix`, each a `TokenData`, and batches mixing their rows by weight; `sources`
    are evaluated one by one as well."""

    def __init__(self, spec: str, data_dir: str | Path, block_size: int, align_rows: AlignRows = "none"):
        self.weights = parse_mix(spec)
        self.sources: dict[str, TokenData] = {}
        for name in self.weights:
            directory, meta = locate(data_dir, name)
            self.sources[name] = TokenData(directory, block_size, meta=meta, align_rows=align_rows)
        (first, data), *others = self.sources.items()
        for name, other in others:
            if not same_tokenizer(data.meta.tokenizer, other.meta.tokenizer):
                raise GptforgeError(
                    f"--data_mix: {name}'s tokenizer ({other.meta.tokenizer.get('kind')}, vocab "
                    f"{other.vocab_size}) is not {first}'s ({data.meta.tokenizer.get('kind')}, vocab "
                    f"{data.vocab_size}); every source must share one tokenizer"
                )
        self.name = "+".join(self.sources)
        self.vocab_size = max(source.vocab_size for source in self.sources.values())
        self.padded_vocab = data.padded_vocab
        self.align_rows = align_rows

    def batches(self, split: str, block_size: int, batch_size: int, **kwargs: Any) -> Batches:
        """Batches of `split` mixing every source's rows by weight; keyword arguments as `Batches` takes."""
        mix = {name: (source.splits[split], self.weights[name]) for name, source in self.sources.items()}
        return Batches(mix, block_size, batch_size, align_rows=self.align_rows, **kwargs)

    def checkpoint_fields(self) -> dict[str, Any]:
        return next(iter(self.sources.values())).checkpoint_fields()
