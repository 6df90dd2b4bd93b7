"""Training batches drawn from token files: which windows each step reads, and this process's share of them.

A step's batch is a pure function of (seed, split, step), so resuming needs one integer and the data a step
sees does not depend on how many processes share it. A split is a list of shards and a window never crosses
from one shard into the next (as llm.c and modded-nanogpt read theirs); a batch may mix the rows of several
splits in set proportions (a mixture) and may start every row at a document. This module reads tokens
through files.TokenDataset only; it knows nothing of how they were prepared or what they mean.
"""

import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from gptforge.data.files import Meta, TokenDataset
from gptforge.errors import GptforgeError

AlignRows = Literal["none", "bos"]


class BatchSampler:
    """The window starts of every step's global batch: a pure function of (seed, split, step).

    The split is one stream of shards of `lengths` tokens (one number: one shard), and a start is a position
    in that stream whose window of `block_size + 1` tokens lies inside one shard. With replacement (nanoGPT's
    sampling) each row starts anywhere such a window fits, uniformly: `[0, n_tokens - block_size)` for one
    shard. Without, each shard is cut into non-overlapping windows and every epoch visits each window once, in
    an order drawn afresh per epoch. Either way nothing but `step` changes as training runs, so the sampler's
    state is that one integer. `stream` keys a mixture's other sources apart (0 is a plain split's).
    """

    def __init__(
        self,
        lengths: int | Sequence[int],
        block_size: int,
        batch_size: int,
        *,
        seed: int = 1337,
        split: str = "train",
        replacement: bool = True,
        stream: int = 0,
    ):
        if block_size < 1 or batch_size < 1 or seed < 0:
            raise GptforgeError("block_size and batch_size must be positive and seed non-negative")
        lengths = np.atleast_1d(np.asarray(lengths, dtype=np.int64))
        self.n_tokens = int(lengths.sum())
        if lengths.max() < block_size + 1:
            what = (f"the {split} split has {self.n_tokens:,} tokens" if len(lengths) == 1 else
                    f"the longest of the {split} split's {len(lengths):,} shards has {lengths.max():,} "
                    "tokens")
            raise GptforgeError(
                f"{what}, fewer than block_size + 1 = {block_size + 1}; "
                "use a smaller --block_size or more data"
            )
        self.block_size, self.batch_size = block_size, batch_size
        self.seed, self.split, self.replacement = seed, split, replacement
        self._shard_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        self._spans = np.maximum(lengths - block_size, 0)  # starts of shard i: [0, length_i - block_size)
        self._windows = np.maximum((lengths - 1) // block_size, 0)  # window k: tokens[k*B : k*B + B + 1]
        self.n_windows = int(self._windows.sum())
        self._key = [seed, zlib.crc32(split.encode()), *([stream] if stream else [])]

    def starts(self, step: int) -> np.ndarray:
        """The `batch_size` window starts of global step `step` (int64)."""
        if self.replacement:
            rng = np.random.default_rng([*self._key, 0, step])
            places = rng.integers(0, int(self._spans.sum()), size=self.batch_size)
            return self._place(places, self._spans, 1)
        rows = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, positions = np.divmod(rows, self.n_windows)
        windows = np.empty_like(rows)
        for epoch in np.unique(epochs):  # a batch spans at most a few epochs
            here = epochs == epoch
            windows[here] = shuffle_index(positions[here], self.n_windows, [*self._key, 1, int(epoch)])
        return self._place(windows, self._windows, self.block_size)

    def _place(self, index: np.ndarray, counts: np.ndarray, stride: int) -> np.ndarray:
        """The stream positions of items `index` when shard i holds `counts[i]` of them, `stride` apart."""
        ends = np.cumsum(counts)
        shard = np.searchsorted(ends, index, side="right")
        return self._shard_starts[shard] + (index - (ends[shard] - counts[shard])) * stride


def shuffle_index(index: np.ndarray, n: int, key: list[int]) -> np.ndarray:
    """`perm[index]` for a random permutation `perm` of `range(n)` chosen by `key`, without building `perm`.

    A 4-round Feistel network is a bijection of the integers below an even power of two; re-applying it to
    values that land at or above `n` ("cycle walking", under 4 rounds on average) turns it into a bijection of
    `range(n)`. An epoch over billions of tokens is thus shuffled in constant memory.
    """
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    low = np.uint64((1 << half) - 1)
    round_keys = np.random.default_rng(key).integers(0, 1 << 63, size=4, dtype=np.uint64)
    values = np.asarray(index, dtype=np.uint64).copy()
    todo = np.ones(len(values), dtype=bool)
    with np.errstate(over="ignore"):  # the mixing multiplies wrap around on purpose
        while todo.any():
            left, right = values[todo] >> np.uint64(half), values[todo] & low
            for round_key in round_keys:
                left, right = right, left ^ (_mix(right ^ round_key) & low)
            values[todo] = (left << np.uint64(half)) | right
            todo = values >= n
    return values.astype(np.int64)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def mixture_rows(weights: np.ndarray, batch_size: int, key: list[int], step: int) -> np.ndarray:
    """Which source each row of global step `step` comes from: `weights[k]` of the rows (systematic
    sampling: each source gets `weights[k] * batch_size` rows rounded down or up, every step), in an order
    drawn afresh per step."""
    rng = np.random.default_rng([*key, 2, step])
    bounds = np.cumsum(weights)
    bounds[-1] = 1.0  # rounding never leaves a last sliver unowned
    which = np.searchsorted(bounds, (rng.random() + np.arange(batch_size)) / batch_size, side="right")
    return rng.permutation(which)


class Batches:
    """This process's share of every step's global batch, as (x, y) int64 tensors on `device`.

    The global batch of step s is `batch_size` rows of `block_size` tokens (all ranks and micro-steps
    together); rank r of `world_size` takes rows `[r * batch_size // world_size, (r + 1) * batch_size //
    world_size)`, so the data a step sees does not depend on how many processes share it. On CUDA the rows go
    through pinned memory with non-blocking copies; `prefetch=True` gathers the next step's rows on a
    background thread meanwhile.

    `dataset` is one split, or a mixture `{name: (split, weight)}`: each row of a step is drawn from one
    source, `weight` of the rows from each (`mixture_rows`), and from there as that source's own sampler
    draws it. `align_rows="bos"` moves each row's start back to the end-of-text token that opens the
    document holding it (the first such token of the shard when none comes before), so every row's targets
    begin with a document's first token, as modded-nanogpt's BOS-aligned batches do.
    """

    def __init__(
        self,
        dataset: TokenDataset | Mapping[str, tuple[TokenDataset, float]],
        block_size: int,
        batch_size: int,
        *,
        seed: int = 1337,
        replacement: bool = True,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        prefetch: bool = False,
        step: int = 0,
        align_rows: AlignRows = "none",
    ):
        if not 0 <= rank < world_size:
            raise GptforgeError(f"rank {rank} is not in [0, {world_size})")
        if batch_size % world_size:
            raise GptforgeError(
                f"the global batch of {batch_size} rows does not split evenly over {world_size} processes"
            )
        if align_rows not in ("none", "bos"):
            raise GptforgeError(f"--align_rows={align_rows!r} is not one of 'none', 'bos'")
        sources = {"": (dataset, 1.0)} if isinstance(dataset, TokenDataset) else dict(dataset)
        if align_rows != "none" and not replacement:
            raise GptforgeError("rows aligned to documents are drawn with replacement only")
        if len(sources) > 1 and not replacement:
            raise GptforgeError("a mixture draws its rows with replacement only")
        self.datasets = [split for split, _ in sources.values()]
        self.samplers = [
            BatchSampler(d.lengths, block_size, batch_size, seed=seed, split=d.split, replacement=replacement,
                         stream=k)
            for k, d in enumerate(self.datasets)
        ]
        self.dataset, self.sampler = self.datasets[0], self.samplers[0]
        weights = np.array([float(weight) for _, weight in sources.values()])
        if not (weights > 0).all():
            raise GptforgeError(f"mixture weights must be positive, got {weights.tolist()}")
        self.weights = weights / weights.sum()
        self._mix = ",".join(f"{name}:{w:g}" for name, w in zip(sources, self.weights, strict=True))
        self.align_rows = align_rows
        share = batch_size // world_size
        self._rows = slice(rank * share, (rank + 1) * share)
        self.device = torch.device(device)
        self._pin = self.device.type == "cuda"
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="gptforge-prefetch") if prefetch else None
        self._next: tuple[int, Future] | None = None
        self.step = step

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (x, y) of global step `step`; y is x shifted by one token."""
        if self._next is not None and self._next[0] == step:
            x, y = self._next[1].result()
        else:
            x, y = self._host(step)
        if self._pool is not None:
            self._next = (step + 1, self._pool.submit(self._host, step + 1))
        return x.to(self.device, non_blocking=self._pin), y.to(self.device, non_blocking=self._pin)

    def _host(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.datasets) == 1:
            rows = self._windows(0, self.sampler.starts(step)[self._rows])
        else:
            which = mixture_rows(self.weights, self.sampler.batch_size, self.sampler._key, step)[self._rows]
            rows = np.empty((len(which), self.sampler.block_size + 1), dtype=np.int64)
            for k in np.unique(which):
                here = which == k
                rows[here] = self._windows(k, self.samplers[k].starts(step)[self._rows][here])
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))
        return (x.pin_memory(), y.pin_memory()) if self._pin else (x, y)

    def _windows(self, k: int, starts: np.ndarray) -> np.ndarray:
        """Source k's rows at `starts`, moved to their documents' starts first if rows are aligned."""
        dataset, length = self.datasets[k], self.sampler.block_size + 1
        if self.align_rows == "bos":
            starts = document_starts(dataset, starts, length)
        return dataset.windows(starts, length)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.get(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int | str]:
        """The position (`step`) plus the settings it is only meaningful with: a few integers (and, for a
        mixture or aligned rows, their names) for a checkpoint."""
        s = self.sampler
        state: dict[str, int | str] = {
            "step": self.step,
            "seed": s.seed,
            "block_size": s.block_size,
            "batch_size": s.batch_size,
            "replacement": int(s.replacement),
        }
        if len(self.datasets) > 1:
            state["mix"] = self._mix
        if self.align_rows != "none":
            state["align_rows"] = self.align_rows
        return state

    def load_state_dict(self, state: dict[str, int | str]) -> None:
        mine = self.state_dict()
        changed = [k for k in {**state, **mine} if k != "step" and str(state.get(k)) != str(mine.get(k))]
        if changed:
            diffs = ", ".join(f"{k} {state.get(k)} -> {mine.get(k)}" for k in changed)
            raise GptforgeError(f"cannot resume the data order: the batch settings changed ({diffs})")
        self.step = int(state["step"])

    def loss_weights(self, step: int, micro_steps: int) -> list[float] | None:
        """How much each of this process's micro-batches of `step` weighs in the step's loss: None, as every
        row holds block_size targets (the trainer divides by the number of micro-steps)."""
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


def document_starts(dataset: TokenDataset, starts: np.ndarray, length: int) -> np.ndarray:
    """Each start moved back to the last end-of-text token at or before it in its shard (the shard's first one
    when none is), among those a window of `length` tokens fits after."""
    shard = np.searchsorted(dataset.offsets, starts, side="right") - 1
    moved = np.empty_like(starts)
    for i in np.unique(shard):
        here = shard == i
        eots = dataset.eot_positions(int(i))
        fits = int(np.searchsorted(eots, dataset.lengths[i] - length, side="right"))
        if fits == 0:
            raise GptforgeError(
                f"{dataset.directory}/{dataset.shards[i].file} has no end-of-text token followed by "
                f"{length - 1} tokens, so no document to start a row at; use --align_rows=none"
            )
        local = starts[here] - dataset.offsets[i]
        before = np.maximum(np.searchsorted(eots[:fits], local, side="right") - 1, 0)
        moved[here] = dataset.offsets[i] + eots[before]
    return moved


class TokenData:
    """A prepared dataset as training sees it: its train and val splits (each checked to fit a row), batches
    of either, its vocabulary, and what a checkpoint records of it (its tokenizer). `meta` is the directory's
    when not given (`files.locate` reads it for a glob of shards)."""

    def __init__(self, directory: str | Path, block_size: int, *, meta: Meta | None = None,
                 align_rows: AlignRows = "none"):
        self.directory = Path(directory)
        self.name = self.directory.name
        self.meta = meta or Meta.read(self.directory)
        self.splits = {split: TokenDataset(self.directory, split, self.meta) for split in ("train", "val")}
        for data in self.splits.values():  # every split fits a row, checked before any work
            BatchSampler(data.lengths, block_size, 1, split=data.split)
        if align_rows != "none" and self.meta.eot_token is None:
            self.splits["train"].eot_positions(0)  # its one-line error
        self.align_rows = align_rows
        self.vocab_size = self.meta.vocab_size
        self.padded_vocab = self.meta.tokenizer.get("kind") == "gpt2"  # GPT-2's 50257 pads to 50304

    def batches(self, split: str, block_size: int, batch_size: int, **kwargs: Any) -> Batches:
        """Batches of `split`; keyword arguments as `Batches` takes them (seed, rank, device...)."""
        return Batches(self.splits[split], block_size, batch_size, align_rows=self.align_rows, **kwargs)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"tokenizer": self.meta.tokenizer}
