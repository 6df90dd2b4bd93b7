"""`gptforge sample`: text from a trained run, GPT-2 or a model directory, streamed as it is generated.

nanoGPT's sample.py options, plus top_p, seed, stream and which checkpoint. The model decodes token by token
with its KV cache (generate.py); this module turns a prompt into ids and ids back into text with the run's own
tokenizer, and prints text only once it is complete: a BPE token can end halfway through a multi-byte
character. A seed fixes every draw, so the same options give the same text.

`GenerationOptions` and `Decoder` are also `gptforge chat`'s (chat.py): the same options, checks and draws.
"""

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from gptforge import speculative
from gptforge.errors import GptforgeError
from gptforge.generate import decoding_model, stream
from gptforge.options import option
from gptforge.source import DraftOptions
from gptforge.speculative import DRAFT_TOKENS, Speculator
from gptforge.tokenizer import TextStream, Tokenizer, check_token_ids, encode_prompt

SEPARATOR = "---------------"  # between samples, as nanoGPT prints them


@dataclass
class GenerationOptions(DraftOptions):
    """The options of every command that draws tokens from a model (sample, chat): how many, and how."""

    max_new_tokens: int = option(500, "tokens generated per sample (chat: per answer)")
    temperature: float = option(0.8, "1.0 as trained, lower is surer, 0 is greedy")
    top_k: int | None = option(200, "keep only the k likeliest tokens (None: all)")
    top_p: float | None = option(None, "keep the likeliest tokens holding this mass")
    seed: int = option(1337, "the same seed gives the same text")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature < 0:
            raise GptforgeError(f"--temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptforgeError(f"--top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise GptforgeError(f"--top_k={self.top_k} must be at least 1, or None")
        if self.max_new_tokens < 0:
            raise GptforgeError(f"--max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.seed < 0:
            raise GptforgeError(f"--seed={self.seed} must be >= 0")


@dataclass
class SampleOptions(GenerationOptions):
    start: str = option("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = option(10, "samples to draw")
    compile: bool = option(False, "torch.compile the model")
    stream: bool = option(True, "print tokens as they come, else each sample whole")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_samples < 1:
            raise GptforgeError(f"--num_samples={self.num_samples} must be at least 1")
        if self.compile and self.draft is not None:
            raise GptforgeError("--compile=True cannot be combined with --draft: speculative decoding "
                                "feeds the model chunks of changing length; leave one out")


def prompt_ids(start: str, tokenizer: Tokenizer) -> list[int]:
    """The ids of `--start` (text, or FILE:path);
    an empty prompt starts from end-of-text where there is one."""
    if start.startswith("FILE:"):
        path = Path(start[len("FILE:"):])
        try:
            start = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GptforgeError(f"--start=FILE:{path}: cannot read it ({type(e).__name__})") from None
    return encode_prompt(tokenizer, start, "--start")


class Decoder:
    """A model placed on its device to decode, with its tokenizer and the draws its options make: what
    `gptforge sample` and `gptforge chat` generate with."""

    def __init__(self, opts: GenerationOptions, compile: bool = False):
        self.opts = opts
        self.device, dtype = opts.placement()
        self.source = opts.load()
        self.tokenizer = self.source.tokenizer
        model = decoding_model(self.source.model, self.device, dtype, opts.quantize)
        self.config = model.config
        self.model: torch.nn.Module = torch.compile(model) if compile else model
        draft = opts.load_draft(self.source)
        self.speculator: Speculator | None = None
        if draft is not None:
            draft_model = decoding_model(draft.model, self.device, dtype, opts.quantize)
            self.speculator = Speculator(model, draft_model, opts.draft_tokens or DRAFT_TOKENS)
        self.generator = self.seeded()

    def seeded(self) -> torch.Generator:
        """A generator at `--seed` (torch's own seed set too): from here on, the same options draw the same
        tokens."""
        torch.manual_seed(self.opts.seed)
        return torch.Generator(device=self.device).manual_seed(self.opts.seed)

    def tokens(
        self, prompt: list[int], max_new_tokens: int | None = None, stop_tokens: Iterable[int] = ()
    ) -> Iterator[int]:
        """The ids that follow `prompt`, drawn one at a time with the options' temperature, top_k and top_p
        from `self.generator`: `max_new_tokens` of them (default the options'), or up to and including the
        first of `stop_tokens`. With a draft they are drawn speculatively: from the same distribution, but
        not the same draws as without one."""
        idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
        opts = self.opts
        steps = opts.max_new_tokens if max_new_tokens is None else max_new_tokens
        draws = dict(temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
                     generator=self.generator, stop_tokens=stop_tokens)
        if self.speculator is not None:
            tokens = speculative.stream(self.speculator, idx, steps, **draws)  # type: ignore[arg-type]
        else:
            tokens = stream(self.model, idx, steps, **draws)  # type: ignore[arg-type]
        for token in tokens:
            yield int(token[0])


def text_pieces(tokenizer: Tokenizer, tokens: Iterable[int]) -> Iterator[str]:
    """The text of `tokens` piece by piece, each piece complete characters, as soon as they are complete."""
    text = TextStream(tokenizer)
    for token in tokens:
        piece = text.push(token)
        if piece:
            yield piece
    if rest := text.flush():
        yield rest


class Sampler(Decoder):
    """A model on its device with its tokenizer: draws samples as streams of text pieces."""

    opts: SampleOptions

    def __init__(self, opts: SampleOptions):
        super().__init__(opts, compile=opts.compile)
        self.prompt = prompt_ids(opts.start, self.tokenizer)
        check_token_ids(max(self.prompt), self.config.vocab_size, "the prompt")

    def samples(self) -> Iterator[Iterator[str]]:
        """`num_samples` samples, each the prompt's text and then its new text piece by piece."""
        self.generator = self.seeded()
        for _ in range(self.opts.num_samples):
            yield self._one()

    def _one(self) -> Iterator[str]:
        yield self.tokenizer.decode(self.prompt)
        yield from text_pieces(self.tokenizer, self.tokens(self.prompt))


def sample(opts: SampleOptions, out: TextIO | None = None) -> list[str]:
    """Print `num_samples` samples to `out` (default stdout), separated as nanoGPT does;
    returns their texts."""
    out = out or sys.stdout
    texts = []
    sampler = Sampler(opts)
    for pieces in sampler.samples():
        parts = []
        for piece in pieces:
            parts.append(piece)
            if opts.stream:
                out.write(piece)
                out.flush()
        text = "".join(parts)
        out.write(("" if opts.stream else text) + f"\n{SEPARATOR}\n")
        out.flush()
        texts.append(text)
    if sampler.speculator is not None:
        print(speculative.report(sampler.speculator.acceptance), file=sys.stderr)
    return texts
