"""`gptforge chat`: a conversation in the terminal with a finetuned assistant, its answers streamed.

The run's chat template (chat_template.py) renders the conversation, system prompt first, and the model
answers until a marker ends its turn (the end-of-turn marker, or any other: no text is a marker, so none can
be part of an answer); markers are never printed. An answer stops at `--max_new_tokens` or where the context
ends, with a note; a conversation that outgrows the context forgets its oldest turns, with a note (the system
prompt stays). Notes and errors go to stderr, so `--prompt` writes the answer alone to stdout. Decoding is
sample.py's `Decoder`: the same options, checks and seeded draws as `gptforge sample`.

This module owns the conversation and the terminal (readline, the slash commands, Ctrl-C); it writes no
files and knows no HTTP.
"""

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal, TextIO

from gptforge.chat_template import ChatTemplate
from gptforge.errors import GptforgeError
from gptforge.options import option
from gptforge.sample import Decoder, GenerationOptions, text_pieces

PROMPT = "> "
COMMANDS = """\
  /reset        forget the conversation (the system prompt stays)
  /system TEXT  set the system prompt (none without TEXT), and reset
  /quit         leave (or Ctrl-D); Ctrl-C stops an answer"""


@dataclass
class ChatOptions(GenerationOptions):
    system: str = option("", "the system prompt (empty: none)")
    prompt: str = option("", "answer this one message on stdout and exit (empty: chat in the terminal)")


@dataclass
class Answer:
    """What the assistant said, and why it stopped: its turn ended, or it was cut (`max_new_tokens`, the
    context), or Ctrl-C stopped it."""

    text: str
    ending: Literal["end", "max_new_tokens", "context", "stopped"]


class Chat:
    """A finetuned model, its template and one conversation: the system prompt and the (user, assistant)
    turns so far."""

    def __init__(self, opts: ChatOptions, notes: TextIO | None = None):
        self.opts = opts
        self.notes = notes or sys.stderr
        self.decoder = Decoder(opts)
        self.name = self.decoder.source.name
        template = self.decoder.source.chat_template
        if template is None:
            raise GptforgeError(f"{self.name} has no chat template: finetune it with `gptforge sft` first")
        self.template: ChatTemplate = template
        self.tokenizer = self.decoder.tokenizer
        self.markers = {template.system, template.user, template.assistant, template.end}
        self.context = self.decoder.config.block_size
        self.system = ""
        self.turns: list[tuple[str, str]] = []
        try:
            self.reset(opts.system)
        except GptforgeError as e:
            raise GptforgeError(f"--system: {e}") from None

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation; with `system`, the system prompt becomes it (empty: none)."""
        if system is not None:
            self.tokenizer.encode(system)  # text the tokenizer cannot encode: an error now, not every turn
            self.system = system
        self.turns.clear()

    def messages(self, user: str, turns: list[tuple[str, str]]) -> list[dict[str, str]]:
        said = [{"role": "system", "content": self.system}] if self.system else []
        for question, answer in turns:
            said += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        return [*said, {"role": "user", "content": user}]

    def prompt(self, user: str) -> list[int]:
        """The ids of the conversation and `user`'s message, ending where the model answers. The oldest turns
        are forgotten (and a note says so) until an answer of `max_new_tokens`, or half the context, fits."""
        room = min(self.opts.max_new_tokens, self.context // 2)
        for first in range(len(self.turns) + 1):
            ids, _ = self.template.render(self.tokenizer, self.messages(user, self.turns[first:]), True)
            if len(ids) + room <= self.context:
                break
        if len(ids) + min(room, 1) > self.context:
            what = "the system prompt and this message take" if self.system else "this message takes"
            raise GptforgeError(f"{what} {len(ids)} tokens: no room for an answer in the model's "
                                f"{self.context}-token context")
        if first:
            del self.turns[:first]
            kept = ", kept the system prompt" if self.system else ""
            self.note(f"the conversation outgrew the model's {self.context}-token context: forgot its oldest "
                      f"{first} turn{'s' if first > 1 else ''}{kept}")
        return ids

    def answer(self, user: str, out: TextIO) -> Answer:
        """Answer `user`'s message, streaming the text to `out` (then a newline), and keep the turn. Ctrl-C
        (KeyboardInterrupt) stops the answer where it is: what was said stays in the conversation."""
        ids = self.prompt(user)
        budget = min(self.opts.max_new_tokens, self.context - len(ids))
        ended = False

        def until_marker() -> Iterator[int]:
            nonlocal ended
            for token in self.decoder.tokens(ids, budget, self.markers):
                if token in self.markers:
                    ended = True
                    return
                yield token

        said: list[str] = []
        stopped = False
        try:
            for piece in text_pieces(self.tokenizer, until_marker()):
                said.append(piece)
                out.write(piece)
                out.flush()
        except KeyboardInterrupt:
            stopped = True
        out.write("\n")
        out.flush()
        text = "".join(said)
        self.turns.append((user, text))
        if stopped:
            self.note("stopped")
            return Answer(text, "stopped")
        if ended:
            return Answer(text, "end")
        if budget < self.opts.max_new_tokens:
            self.note(f"cut: the answer reached the end of the model's {self.context}-token context")
            return Answer(text, "context")
        if budget:
            self.note(f"cut at --max_new_tokens={budget}")
        return Answer(text, "max_new_tokens")

    def note(self, text: str) -> None:
        print(f"[{text}]", file=self.notes, flush=True)

    def banner(self) -> str:
        source = self.decoder.source
        at = f", iteration {source.iter_num:,}" if source.iter_num is not None else ""
        params = source.model.get_num_params() / 1e6
        system = f"\nsystem prompt: {self.system}" if self.system else ""
        return (f"gptforge chat: {self.name}{at} ({params:.2f}M parameters, {self.context}-token context, "
                f"{self.decoder.device})\n{COMMANDS}{system}")


def line_editing() -> None:
    """Line editing and history for `input`, where Python has readline (importing it turns them on);
    Windows' Python has none: plain lines."""
    with contextlib.suppress(ImportError):
        import readline  # noqa: F401


def repl(chat: Chat, read: Callable[[str], str] = input, out: TextIO | None = None) -> None:
    """Talk until /quit or end of input: each line is a message, or a command."""
    out = out or sys.stdout
    print(chat.banner(), file=out, flush=True)
    while True:
        try:
            line = read(PROMPT).strip()
        except EOFError:  # Ctrl-D
            print(file=out, flush=True)
            return
        except KeyboardInterrupt:  # Ctrl-C at the prompt drops the line, as shells do
            print(file=out, flush=True)
            continue
        if not line:
            continue
        command, _, argument = line.partition(" ")
        try:
            if command == "/quit":
                return
            if command == "/reset":
                chat.reset()
                chat.note("conversation forgotten" + (", system prompt kept" if chat.system else ""))
            elif command == "/system":
                chat.reset(argument.strip())
                chat.note(f"system prompt: {chat.system}" if chat.system else "no system prompt")
            elif command.startswith("/"):
                raise GptforgeError(f"unknown command {command}: they are /reset, /system TEXT and /quit")
            else:
                chat.answer(line, out)
        except GptforgeError as e:  # a message the tokenizer cannot encode, or one too long: chat on
            print(f"error: {e}", file=chat.notes, flush=True)
        except KeyboardInterrupt:  # Ctrl-C just before or after an answer's tokens: the chat goes on too
            print(file=out, flush=True)


def chat(opts: ChatOptions, out: TextIO | None = None) -> None:
    """`gptforge chat`: one answer to `--prompt` on `out` (default stdout), or a conversation in the
    terminal."""
    session = Chat(opts)
    if opts.prompt:
        if session.answer(opts.prompt, out or sys.stdout).ending == "stopped":
            raise KeyboardInterrupt  # a script's Ctrl-C ends the command, as it would any other
        return
    line_editing()
    repl(session, out=out)
