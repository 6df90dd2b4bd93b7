"""Training batches drawn from token files: which windows each step reads, and this process's share of them.

A step's batch is a pure function of (seed, split, step), so resuming needs one integer and the data a step
sees does not depend on how many processes share it. This module reads tokens through files.TokenDataset
only; it knows nothing of how they were prepared or what they mean.
"""

import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.data.files import Meta, TokenDataset
from gptforge.errors import GptforgeError


class BatchSampler:
    """The window starts of every step's global batch: a pure function of (seed, split, step).

    With replacement (nanoGPT's sampling) each row starts anywhere in `[0, n_tokens - block_size)`. Without,
    the data is cut into non-overlapping windows and every epoch visits each window once, in an order drawn
    afresh per epoch. Either way nothing but `step` changes as training runs, so the sampler's state is that
    one integer.
    """

    def __init__(
        self,
        n_tokens: int,
        block_size: int,
        batch_size: int,
        *,
        seed: int = 1337,
        split: str = "train",
        replacement: bool = True,
    ):
        if block_size < 1 or batch_size < 1 or seed < 0:
            raise GptforgeError("block_size and batch_size must be positive and seed non-negative")
        if n_tokens < block_size + 1:
            raise GptforgeError(
                f"the {split} split has {n_tokens:,} tokens, fewer than block_size + 1 = {block_size + 1}; "
                f"use a smaller --block_size or more data"
            )
        self.n_tokens, self.block_size, self.batch_size = n_tokens, block_size, batch_size
        self.seed, self.split, self.replacement = seed, split, replacement
        self.n_windows = (n_tokens - 1) // block_size  # window k is tokens[k*B : k*B + B + 1]
        self._key = [seed, zlib.crc32(split.encode())]

    def starts(self, step: int) -> np.ndarray:
        """The `batch_size` window starts of global step `step` (int64)."""
        if self.replacement:
            rng = np.random.default_rng([*self._key, 0, step])
            return rng.integers(0, self.n_tokens - self.block_size, size=self.batch_size)
        rows = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, positions = np.divmod(rows, self.n_windows)
        windows = np.empty_like(rows)
        for epoch in np.unique(epochs):  # a batch spans at most a few epochs
            here = epochs == epoch
            windows[here] = shuffle_index(positions[here], self.n_windows, [*self._key, 1, int(epoch)])
        return windows * self.block_size


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


class Batches:
    """This process's share of every step's global batch, as (x, y) int64 tensors on `device`.

    The global batch of step s is `batch_size` rows of `block_size` tokens (all ranks and micro-steps
    together); rank r of `world_size` takes rows `[r * batch_size // world_size, (r + 1) * batch_size //
    world_size)`, so the data a step sees does not depend on how many processes share it. On CUDA the rows go
    through pinned memory with non-blocking copies; `prefetch=True` gathers the next step's rows on a
    background thread meanwhile.
    """

    def __init__(
        self,
        dataset: TokenDataset,
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
    ):
        if not 0 <= rank < world_size:
            raise GptforgeError(f"rank {rank} is not in [0, {world_size})")
        if batch_size % world_size:
            raise GptforgeError(
                f"the global batch of {batch_size} rows does not split evenly over {world_size} processes"
            )
        self.dataset = dataset
        self.sampler = BatchSampler(
            len(dataset), block_size, batch_size, seed=seed, split=dataset.split, replacement=replacement
        )
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
        rows = self.dataset.windows(self.sampler.starts(step)[self._rows], self.sampler.block_size + 1)
        x = torch.from_numpy(rows[:, :-1].astype(np.int64))
        y = torch.from_numpy(rows[:, 1:].astype(np.int64))
        return (x.pin_memory(), y.pin_memory()) if self._pin else (x, y)

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.get(self.step)
        self.step += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        """The position (`step`) plus the settings it is only meaningful with: a few integers for a
        checkpoint."""
        s = self.sampler
        return {
            "step": self.step,
            "seed": s.seed,
            "block_size": s.block_size,
            "batch_size": s.batch_size,
            "replacement": int(s.replacement),
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        changed = [k for k in mine if k != "step" and int(state[k]) != mine[k]]
        if changed:
            diffs = ", ".join(f"{k} {state[k]} -> {mine[k]}" for k in changed)
            raise GptforgeError(f"cannot resume the data order: the batch settings changed ({diffs})")
        self.step = int(state["step"])

    def loss_weights(self, step: int, micro_steps: int) -> list[float] | None:
        """How much each of this process's micro-batches of `step` weighs in the step's loss: None, as every
        row holds block_size targets (the trainer divides by the number of micro-steps)."""
        return None

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)


class TokenData:
    """A prepared dataset as training sees it: its train and val splits (each checked to fit a row), batches
    of either, its vocabulary, and what a checkpoint records of it (its tokenizer)."""

    def __init__(self, directory: str | Path, block_size: int):
        self.directory = Path(directory)
        self.name = self.directory.name
        self.meta = Meta.read(self.directory)
        self.splits = {split: TokenDataset(self.directory, split, self.meta) for split in ("train", "val")}
        for data in self.splits.values():  # every split fits a row, checked before any work
            BatchSampler(len(data), block_size, 1, split=data.split)
        self.vocab_size = self.meta.vocab_size
        self.padded_vocab = self.meta.tokenizer.get("kind") == "gpt2"  # GPT-2's 50257 pads to 50304

    def batches(self, split: str, block_size: int, batch_size: int, **kwargs: Any) -> Batches:
        """Batches of `split`; keyword arguments as `Batches` takes them (seed, rank, device...)."""
        return Batches(self.splits[split], block_size, batch_size, **kwargs)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"tokenizer": self.meta.tokenizer}
