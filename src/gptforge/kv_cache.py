"""KV caches: the keys and values of earlier positions,
kept so that decoding a token costs one token's compute.

- `KVCache`: a batch of sequences that advance together (`generate.py`'s decoding loop).
- `SlotKVCache`: `n_slots` independent sequences, each at its own length (the server's continuous batching).

Each cache owns how a query attends to what it holds (`attend`), so the model's attention reads "no cache:
causal attention; a cache: ask the cache". This module knows tensors and the model's shape (`GPTConfig`),
nothing else.
"""

from typing import Protocol

import torch
from torch.nn import functional as F

from gptforge.model import GPTConfig


class Cache(Protocol):
    """What the model asks of a cache: where the new tokens sit, attention over the cached keys,
    and advancing."""

    @property
    def pos(self) -> int | torch.Tensor:
        """Positions already cached: an int, or (rows, 1) for caches whose rows each have their own."""
        ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store the new keys/values (B, nh, T, hs) of `layer` and return the queries' attention output."""
        ...

    def advance(self, length: int) -> None:
        """`length` more positions are cached (after every layer has stored them)."""
        ...


class KVCache:
    """Keys and values of every layer, preallocated for `max_len` positions.

    Decoding one token then costs one token's compute: attention reads the cached keys and values of all
    earlier positions instead of recomputing them. `pos` counts the positions already cached.
    """

    def __init__(self, config: GPTConfig, batch_size: int, max_len: int | None = None):
        self.n_layer, self.batch_size = config.n_layer, batch_size
        self.max_len = max_len or config.block_size
        self.head_shape = (config.n_head, config.n_embd // config.n_head)
        self.k: torch.Tensor | None = None  # allocated on first use with the dtype/device of the keys
        self.v: torch.Tensor | None = None
        self.pos = 0

    def reset(self) -> None:
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values (B, nh, T, hs) of `layer`; return all cached ones up to this step."""
        if self.k is None or self.v is None:
            n_head, head_size = self.head_shape
            shape = (self.n_layer, self.batch_size, n_head, self.max_len, head_size)
            self.k = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.v = torch.empty(shape, dtype=v.dtype, device=v.device)
        end = self.pos + k.size(2)
        self.k[layer, :, :, self.pos : end] = k
        self.v[layer, :, :, self.pos : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The queries sit at positions pos..pos+T-1 and see every key up to their own position: a plain
        causal mask when nothing is cached, none for a single new token, and an offset mask for a chunk
        after a cached prefix (is_causal would align the mask to the top-left)."""
        past, T = self.pos, q.size(2)
        keys, values = self.update(layer, k, v)
        mask = None
        if past and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=q.device).tril(diagonal=past)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=past == 0 and T > 1)

    def advance(self, length: int) -> None:
        self.pos += length


class SlotKVCache:
    """Keys and values of `n_slots` independent sequences, each at its own length:
    continuous batching's cache.

    A server decodes many requests in one forward: each holds a slot from its prefill until it finishes, and
    requests join and leave between steps. A step feeds one token to each slot of `rows`, in that order: the
    busy slots, or the busy slots and free ones up to a number of rows at which the matmul kernels round each
    row the same way whichever other rows are busy (a free slot's result is then ignored). Attention runs
    slot by slot over exactly that slot's keys, for the same reason (docs/serving.md, "Batching"). All memory
    is allocated here, once.
    """

    def __init__(
        self, config: GPTConfig, n_slots: int, dtype: torch.dtype, device: torch.device | str = "cpu",
        max_len: int | None = None,
    ):
        self.config = config
        self.max_len = max_len or config.block_size
        shape = (config.n_layer, n_slots, config.n_head, self.max_len, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.lengths = [0] * n_slots  # positions cached per slot
        self.busy = [False] * n_slots
        self.rows = list(range(n_slots))  # the slots the next step feeds

    @property
    def pos(self) -> torch.Tensor:
        """The length of each slot of `rows`, (len(rows), 1): where its next token goes."""
        return torch.tensor([self.lengths[s] for s in self.rows], device=self.k.device).unsqueeze(1)

    def slot(self, index: int) -> KVCache:
        """A batch-1 KVCache over the storage of slot `index`, empty:
        prefill a prompt into it, then `occupy`."""
        view = KVCache(self.config, 1, self.max_len)
        view.k, view.v = self.k[:, index : index + 1], self.v[:, index : index + 1]
        return view

    def occupy(self, index: int, length: int) -> None:
        """Slot `index` now holds a sequence of `length` cached positions."""
        self.lengths[index], self.busy[index] = length, True

    def copy(self, source: int, target: int) -> None:
        """Occupy `target` with a copy of `source`'s sequence
        (several samples of one prompt share its prefill)."""
        end = self.lengths[source]
        self.k[:, target, :, :end] = self.k[:, source, :, :end]
        self.v[:, target, :, :end] = self.v[:, source, :, :end]
        self.occupy(target, end)

    def free(self, index: int) -> None:
        self.lengths[index], self.busy[index] = 0, False

    def set_aside(self, index: int, length: int) -> None:
        """Slot `index` holds `length` positions that a `slot` view decodes on its own (speculative decoding):
        a step that feeds it treats it as free, writing at `length`, past them, and its result is ignored."""
        self.lengths[index], self.busy[index] = length, False

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store one new token's keys/values (len(rows), nh, 1, hs) of `layer`, each at its slot's own
        position; return the whole cache of `layer`, (n_slots, nh, max_len, hs): a slot is valid up to its
        length + 1."""
        if k.size(2) != 1:
            raise ValueError("a SlotKVCache step takes one token per slot; prefill each slot through `slot`")
        rows, pos = torch.tensor(self.rows, device=k.device), self.pos.squeeze(1)
        self.k[layer, rows, :, pos] = k[:, :, 0]
        self.v[layer, rows, :, pos] = v[:, :, 0]
        return self.k[layer], self.v[layer]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Each busy slot's new query attends to that slot's keys only, exactly as many as it has; free slots
        get zeros. One attention call per slot keeps a row's result independent of the other rows' lengths."""
        keys, values = self.update(layer, k, v)
        y = torch.zeros_like(q)
        for row, slot in enumerate(self.rows):
            if self.busy[slot]:
                end = self.lengths[slot] + 1  # the cached positions and the new token
                # slices keep every tensor 4-D: SDPA's fused CPU kernel, not its slower 3-D fallback
                y[row : row + 1] = F.scaled_dot_product_attention(
                    q[row : row + 1], keys[slot : slot + 1, :, :end], values[slot : slot + 1, :, :end]
                )
        return y

    def advance(self, length: int) -> None:
        for s in self.rows:
            if self.busy[s]:
                self.lengths[s] += length
