"""`gptforge sample`: text from a trained run, GPT-2 or a model directory, streamed as it is generated.

nanoGPT's sample.py options, plus top_p, seed, stream and which checkpoint. The model decodes token by token
with its KV cache (generate.py); this module turns a prompt into ids and ids back into text with the run's own
tokenizer, and prints text only once it is complete: a BPE token can end halfway through a multi-byte
character. A seed fixes every draw, so the same options give the same text.
"""

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from gptforge.errors import GptforgeError
from gptforge.generate import decoding_model, stream
from gptforge.options import option
from gptforge.source import SourceOptions
from gptforge.tokenizer import TextStream, Tokenizer, check_token_ids, encode_prompt

SEPARATOR = "---------------"  # between samples, as nanoGPT prints them


@dataclass
class SampleOptions(SourceOptions):
    start: str = option("\n", "the prompt, or FILE:path to read it from a file")
    num_samples: int = option(10, "samples to draw")
    max_new_tokens: int = option(500, "tokens generated per sample")
    temperature: float = option(0.8, "1.0 as trained, lower is surer, 0 is greedy")
    top_k: int | None = option(200, "keep only the k likeliest tokens (None: all)")
    top_p: float | None = option(None, "keep the likeliest tokens holding this mass")
    seed: int = option(1337, "the same seed gives the same text")
    compile: bool = option(False, "torch.compile the model")
    stream: bool = option(True, "print tokens as they come, else each sample whole")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.temperature < 0:
            raise GptforgeError(f"--temperature={self.temperature} must be >= 0 (0 is greedy)")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GptforgeError(f"--top_p={self.top_p} must be in (0, 1]")
        if self.top_k is not None and self.top_k < 1:
            raise GptforgeError(f"--top_k={self.top_k} must be at least 1, or None")
        if self.num_samples < 1:
            raise GptforgeError(f"--num_samples={self.num_samples} must be at least 1")
        if self.max_new_tokens < 0:
            raise GptforgeError(f"--max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.seed < 0:
            raise GptforgeError(f"--seed={self.seed} must be >= 0")


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


class Sampler:
    """A model on its device with its tokenizer: draws samples as streams of text pieces."""

    def __init__(self, opts: SampleOptions):
        self.opts = opts
        self.device, dtype = opts.placement()
        source = opts.load()
        model, self.tokenizer = source.model, source.tokenizer
        model = decoding_model(model, self.device, dtype)
        self.model: torch.nn.Module = torch.compile(model) if opts.compile else model
        self.prompt = prompt_ids(opts.start, self.tokenizer)
        check_token_ids(max(self.prompt), model.config.vocab_size, "the prompt")

    def samples(self) -> Iterator[Iterator[str]]:
        """`num_samples` samples, each the prompt's text and then its new text piece by piece."""
        opts = self.opts
        torch.manual_seed(opts.seed)
        generator = torch.Generator(device=self.device).manual_seed(opts.seed)
        for _ in range(opts.num_samples):
            yield self._one(generator)

    def _one(self, generator: torch.Generator) -> Iterator[str]:
        opts = self.opts
        idx = torch.tensor([self.prompt], dtype=torch.long, device=self.device)
        text = TextStream(self.tokenizer)
        yield self.tokenizer.decode(self.prompt)
        tokens = stream(self.model, idx, opts.max_new_tokens,  # type: ignore[arg-type]
                        temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p, generator=generator)
        for token in tokens:
            piece = text.push(int(token[0]))
            if piece:
                yield piece
        yield text.flush()


def sample(opts: SampleOptions, out: TextIO | None = None) -> list[str]:
    """Print `num_samples` samples to `out` (default stdout), separated as nanoGPT does;
    returns their texts."""
    out = out or sys.stdout
    texts = []
    for pieces in Sampler(opts).samples():
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
    return texts
