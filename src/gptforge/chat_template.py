"""The chat template: conversations of system, user and assistant messages as one sequence of token ids.

Each message is its role's marker, its content's ids, and the end-of-turn marker:

    <|system|>You are terse.<|end|><|user|>Spell cat.<|end|><|assistant|>c a t<|end|>

The four markers are special tokens, ids no text encodes to: the four ids right after the tokenizer's own
vocabulary (50257..50260 for GPT-2's BPE, which a 50304-row model already has free; a char or trained-BPE
vocabulary of V gets V..V+3, and a model without those rows grows them). A prompt for the model's answer ends
with `<|assistant|>`; the answer ends at `<|end|>`. Training learns only what the assistant says: its content
and its `<|end|>` are the targets, everything else is context.

The template is stored with every run that uses it (its checkpoint and exports, as `spec()`), so sampling,
chat, serving, evaluation and export render exactly what training saw. This module knows tokenizers and ids,
nothing of models, files or HTTP.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptforge.errors import GptforgeError
from gptforge.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
MARKERS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>", "end": "<|end|>"}
# The same rendering as a Jinja template, for Hugging Face's `apply_chat_template` (tokenizer_config.json).
JINJA = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ChatTemplate:
    """The ids of the four markers; `end` also stops a generated answer."""

    system: int
    user: int
    assistant: int
    end: int

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> "ChatTemplate":
        """The template whose markers are the four ids after `tokenizer`'s vocabulary."""
        v = tokenizer.vocab_size
        return cls(system=v, user=v + 1, assistant=v + 2, end=v + 3)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> "ChatTemplate":
        try:
            return cls(**{name: int(spec[name]) for name in ("system", "user", "assistant", "end")})
        except (KeyError, TypeError, ValueError):
            raise GptforgeError(f"not a chat template: {spec!r}") from None

    def spec(self) -> dict[str, Any]:
        """What a checkpoint or export stores: the marker ids and their text."""
        return {"system": self.system, "user": self.user, "assistant": self.assistant, "end": self.end,
                "markers": MARKERS}

    @property
    def vocab_size(self) -> int:
        """The rows a model needs for every id of this template."""
        return max(self.system, self.user, self.assistant, self.end) + 1

    def role_id(self, role: str) -> int:
        return {"system": self.system, "user": self.user, "assistant": self.assistant}[role]

    def render(
        self, tokenizer: Tokenizer, messages: Sequence[dict[str, str]], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """The ids of `messages` and, per id, whether training predicts it (the assistant's content and its
        end-of-turn). With `add_generation_prompt`, the ids end with the assistant's marker: the model
        answers."""
        ids: list[int] = []
        targets: list[bool] = []
        for message in messages:
            check_message(message)
            content = tokenizer.encode(message["content"])
            learned = message["role"] == "assistant"
            ids += [self.role_id(message["role"]), *content, self.end]
            targets += [False] + [learned] * (len(content) + 1)
        if add_generation_prompt:
            ids.append(self.assistant)
            targets.append(False)
        return ids, targets

    def decode_marker(self, token: int) -> str | None:
        """The text of a marker id, None for any other id."""
        names = {self.system: "system", self.user: "user", self.assistant: "assistant", self.end: "end"}
        return MARKERS[names[token]] if token in names else None


def check_message(message: Any) -> None:
    """A message is {"role": system|user|assistant, "content": a string}; anything else is an error
    saying so."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), str):
        raise GptforgeError(f"a message must be an object with a string 'content', got {str(message)[:80]!r}")
    if message.get("role") not in ROLES:
        raise GptforgeError(f"unknown role {message.get('role')!r}: a message's role is one of "
                            f"{', '.join(ROLES)}")


class ChatTokenizer(Tokenizer):
    """A tokenizer with a chat template's markers: encodes text as the tokenizer does (no text becomes a
    marker) and decodes marker ids as their text, so a finetuned model's output always has a text form."""

    def __init__(self, tokenizer: Tokenizer, template: ChatTemplate):
        self.base, self.template = tokenizer, template
        self.kind = tokenizer.kind
        self.vocab_size = max(tokenizer.vocab_size, template.vocab_size)
        self.eot_token = tokenizer.eot_token

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        return self.base.encode_to_numpy(text)

    def decode(self, ids: Sequence[int]) -> str:
        parts, run = [], []
        for token in ids:
            marker = self.template.decode_marker(int(token))
            if marker is None:
                run.append(token)
                continue
            parts += [self.base.decode(run), marker]
            run = []
        return "".join([*parts, self.base.decode(run)])

    def spec(self) -> dict[str, Any]:
        return {**self.base.spec(), "chat_template": self.template.spec()}

    def token_bytes(self, token: int) -> bytes:
        marker = self.template.decode_marker(token)
        return marker.encode() if marker is not None else self.base.token_bytes(token)
