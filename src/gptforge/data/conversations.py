"""Conversations for supervised finetuning: read, checked, rendered with the chat template, served as batches.

Input is JSON Lines, one conversation a line, in OpenAI's shape (`{"messages": [{"role": "system" | "user" |
"assistant", "content": "..."}, ...]}`) or Alpaca's (`{"instruction", "input", "output"}`: the instruction and
input are the user's turn, the output the assistant's), or a Hugging Face dataset id of either shape. A line
that is neither is an error naming the file and line; a conversation longer than the model's context is
dropped and counted, as users of SFT trainers expect.

Each conversation becomes one row: its ids, and targets only where the assistant speaks (`chat_template.py`);
rows are padded, never packed, so no conversation attends into another. A step's global batch is a pure
function of (seed, split, step), each epoch visiting every conversation once in a fresh order, and the loss of
a step is the mean over all its target tokens, whichever process or micro-step holds them: so resume and
torchrun behave exactly as for pretraining (batches.py). This module knows text, the tokenizer and the
template, not models.
"""

import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gptforge.chat_template import ChatTemplate
from gptforge.data.batches import shuffle_index
from gptforge.errors import GptforgeError
from gptforge.tokenizer import Tokenizer, portable_spec

IGNORE = -1  # the target of a position training does not learn


def read_records(source: str) -> Iterator[tuple[str, Any]]:
    """(where, record) for each conversation of a .jsonl file, or of a Hugging Face dataset id (its train
    split, through `datasets`, which honours HF_HUB_OFFLINE and its cache)."""
    path = Path(source)
    if path.is_file():
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line.decode("utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise GptforgeError(f"{path}:{number}: not a JSON line ({e}); each line is one "
                                        "conversation") from None
        return
    if path.suffix in (".jsonl", ".json") or path.exists():
        raise GptforgeError(f"--data={source}: no such file (a .jsonl file, or a Hugging Face dataset id)")
    try:
        import datasets
    except ImportError:
        raise GptforgeError(f"--data={source} names a Hugging Face dataset, which needs `datasets`: "
                            "pip install 'gptforge[data]'") from None
    try:
        rows = datasets.load_dataset(source, split="train")
    except Exception as e:  # the hub client raises many unrelated types when offline or refused
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GptforgeError(f"cannot load {source} from the Hugging Face hub: {reason}; offline? pass a "
                            "local --data=FILE.jsonl") from None
    for number, row in enumerate(rows):
        yield f"{source}[{number}]", row


def to_messages(record: Any, where: str) -> list[dict[str, str]]:
    """A record's messages: OpenAI's `messages` as they are, Alpaca's fields as a user and an assistant
    turn."""
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        messages = record["messages"]
    elif isinstance(record, dict) and all(isinstance(record.get(k), str) for k in ("instruction", "output")):
        extra = record.get("input") or ""
        if not isinstance(extra, str):
            raise GptforgeError(f"{where}: Alpaca's 'input' must be a string")
        prompt = f"{record['instruction']}\n\n{extra}" if extra else record["instruction"]
        messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    else:
        raise GptforgeError(f"{where}: neither {{\"messages\": [...]}} (OpenAI) nor {{\"instruction\", "
                            "\"input\", \"output\"} (Alpaca)")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        raise GptforgeError(f"{where}: the conversation has no assistant turn, so nothing to learn")
    return messages


class Conversations:
    """Rendered conversations that fit a context of `block_size + 1` ids: `ids` and `targets` per row."""

    def __init__(self, source: str, ids: list[np.ndarray], targets: list[np.ndarray], dropped: int = 0):
        self.source, self.ids, self.targets, self.dropped = source, ids, targets, dropped
        # what each conversation contributes to the loss: its target tokens (the first id is never a target)
        self.n_targets = np.array([int(t[1:].sum()) for t in targets], dtype=np.int64)

    @classmethod
    def read(cls, source: str, tokenizer: Tokenizer, template: ChatTemplate,
             block_size: int) -> "Conversations":
        """Every conversation of `source`, rendered; those longer than the context are dropped and counted."""
        ids, targets, dropped = [], [], 0
        for where, record in read_records(source):
            try:
                row_ids, row_targets = template.render(tokenizer, to_messages(record, where))
            except GptforgeError as e:
                message = str(e)
                raise GptforgeError(message if message.startswith(where) else f"{where}: {message}") from None
            if len(row_ids) > block_size + 1:
                dropped += 1
                continue
            ids.append(np.asarray(row_ids, dtype=np.int64))
            targets.append(np.asarray(row_targets, dtype=bool))
        if not ids:
            raise GptforgeError(f"--data={source} has no conversation that fits block_size={block_size}"
                                + (f" ({dropped} longer ones dropped)" if dropped else ""))
        return cls(source, ids, targets, dropped)

    def split(self, fraction: float, seed: int) -> tuple["Conversations", "Conversations"]:
        """(train, val): a seeded `fraction` of the conversations (at least one) held out, the rest in
        order."""
        if len(self) < 2:
            raise GptforgeError(f"--data={self.source} has one conversation: give --val_data, or more data")
        n_val = min(max(1, round(len(self) * fraction)), len(self) - 1)
        is_val = np.zeros(len(self), dtype=bool)
        is_val[np.random.default_rng(seed).choice(len(self), size=n_val, replace=False)] = True
        pick = [np.flatnonzero(~is_val), np.flatnonzero(is_val)]
        train, val = (Conversations(self.source, [self.ids[i] for i in p], [self.targets[i] for i in p])
                      for p in pick)
        train.dropped = self.dropped
        return train, val

    def __len__(self) -> int:
        return len(self.ids)

    def rows(self, indices: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets (IGNORE where not learned, and on padding) of the conversations `indices`."""
        x = np.zeros((len(indices), block_size), dtype=np.int64)
        y = np.full((len(indices), block_size), IGNORE, dtype=np.int64)
        for row, i in enumerate(indices):
            ids, targets = self.ids[i], self.targets[i]
            n = len(ids) - 1
            x[row, :n] = ids[:-1]
            y[row, :n] = np.where(targets[1:], ids[1:], IGNORE)
        return torch.from_numpy(x), torch.from_numpy(y)


class ConversationBatches:
    """This process's share of each step's global batch of conversations, as `data.Batches` serves windows:
    `get(step)`, the few integers of `state_dict`, and the weight of each micro-batch in the step's loss."""

    def __init__(self, conversations: Conversations, block_size: int, batch_size: int, *, seed: int = 1337,
                 split: str = "train", rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 **_: Any):
        if batch_size % world_size:
            raise GptforgeError(f"the global batch of {batch_size} rows does not split evenly over "
                                f"{world_size} processes")
        self.conversations, self.block_size, self.batch_size = conversations, block_size, batch_size
        self.seed, self.world_size = seed, world_size
        self._key = [seed, zlib.crc32(split.encode())]
        share = batch_size // world_size
        self._rows = slice(rank * share, (rank + 1) * share)
        self.device = torch.device(device)
        self.step = 0

    def indices(self, step: int) -> np.ndarray:
        """The conversations of global step `step`: every epoch visits each once, in an order drawn per
        epoch."""
        n = len(self.conversations)
        rows = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epochs, positions = np.divmod(rows, n)
        chosen = np.empty_like(rows)
        for epoch in np.unique(epochs):
            here = epochs == epoch
            chosen[here] = shuffle_index(positions[here], n, [*self._key, 1, int(epoch)])
        return chosen

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.conversations.rows(self.indices(step)[self._rows], self.block_size)
        return x.to(self.device), y.to(self.device)

    def loss_weights(self, step: int, micro_steps: int) -> list[float]:
        """Each micro-batch's weight, so that its mean loss times the weight, summed over micro-steps and
        averaged over processes (DDP), is the mean over every target token of the global batch."""
        counts = self.conversations.n_targets[self.indices(step)]
        total = max(int(counts.sum()), 1)
        mine = counts[self._rows].reshape(micro_steps, -1).sum(axis=1)
        return [self.world_size * int(c) / total for c in mine]

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "seed": self.seed, "block_size": self.block_size,
                "batch_size": self.batch_size, "conversations": len(self.conversations)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        mine = self.state_dict()
        changed = [k for k in mine if k != "step" and int(state.get(k, -1)) != mine[k]]
        if changed:
            diffs = ", ".join(f"{k} {state.get(k)} -> {mine[k]}" for k in changed)
            raise GptforgeError("cannot resume the data order: the conversations or batch settings changed "
                                f"({diffs})")
        self.step = int(state["step"])

    def close(self) -> None:
        pass


class ConversationData:
    """Conversations as the trainer draws from them (`train.TrainingData`): train and val, their batches, and
    what a checkpoint records (the tokenizer and the chat template)."""

    def __init__(self, train: Conversations, val: Conversations, tokenizer: Tokenizer,
                 template: ChatTemplate):
        self.splits = {"train": train, "val": val}
        self.tokenizer, self.template = tokenizer, template
        self.name = Path(train.source).name
        self.vocab_size = template.vocab_size
        self.padded_vocab = False

    def batches(self, split: str, block_size: int, batch_size: int, **kwargs: Any) -> ConversationBatches:
        return ConversationBatches(self.splits[split], block_size, batch_size, split=split, **kwargs)

    def checkpoint_fields(self) -> dict[str, Any]:
        return {"tokenizer": portable_spec(self.tokenizer), "chat_template": self.template.spec()}
