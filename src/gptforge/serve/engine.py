"""Continuous batching: one decode loop that serves many completion requests at once.

The `Engine` owns the model on a thread of its own. Jobs (a prompt's token ids, how to sample, how many
samples) wait in a bounded queue; between two decode steps the waiting jobs take free slots of a
`SlotKVCache`, each prompt prefilled alone, and then every busy slot advances by one token in a single batched
forward. A slot is freed as soon as its sample ends (a stop token: end-of-text, or the job's own such as a
chat's end of turn; a stop string; `max_tokens`) or its job is cancelled (its client went away), and the next
waiting job takes it before the next step.

Numerics: a prefill's shape depends on its prompt only; with `batch_invariant` each step has one of the
sizes at which every row rounds as in a step of all the slots (`invariant_step_sizes`, measured at start:
the smallest that holds the busy slots, free ones filling it up); attention, the draw and the logprobs run
row by row, and every sample draws from its own seeded generator, so a seeded job gives the same text alone
or among others. A sample draws from its logits steered by OpenAI's `logit_bias` and
presence and frequency penalties (row by row, so the guarantee holds); what it reports as logprobs is the
model's own distribution, the log-softmax of the raw logits, before any of that. The engine knows text only
as far as samples need it: complete characters out (`TextStream`) and stop strings. It knows nothing of
HTTP: that is app.py's, above it.

With a draft model, a sample without logprobs, logit_bias or penalties decodes speculatively (speculative.py):
at each step it runs a round of its own, batch 1 over its slot's keys and values and a draft cache slot of
its own, after the batched forward of the others, which treats its slot as free. Its numbers depend on its own
sequence only, so the guarantee holds for it too; a steered or logprobs sample decodes as without a draft.
"""

import hashlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from gptforge import __version__
from gptforge.generate import filter_logits, overflow_free
from gptforge.kv_cache import KVCache, SlotKVCache
from gptforge.model import GPT
from gptforge.speculative import DRAFT_TOKENS, Speculator
from gptforge.tokenizer import TextStream, Tokenizer

log = logging.getLogger("gptforge.serve")


HEAD_CHUNK = 1 << 26  # prompt logits computed at once (elements): 256 MiB in float32, whatever the vocabulary
PROBE_TOKENS = 8  # the length of the sequence `invariant_step_sizes` decodes from


@dataclass(frozen=True)
class Sampling:
    """How a job samples (OpenAI's fields): greedy at temperature 0; `seed` None draws a fresh one;
    `max_tokens` 0 draws nothing (the prompt is scored only).

    `stop_tokens` end a sample and are never shown: a chat's end-of-turn id; None means the tokenizer's
    end-of-text (none for a tokenizer without one), as a completion ends.

    `logit_bias` ((token, bias) pairs) is added to the logits and OpenAI's penalties are subtracted,
    `frequency_penalty` times the count of each token the sample drew so far and `presence_penalty` once for
    each token it drew at all, before temperature, top-k and top-p; greedy samples are steered too.

    `logprobs` (not None) reports each drawn token's logprob and its `logprobs` likeliest alternatives;
    `prompt_logprobs` the prompt's tokens' too, each given the tokens before it."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stop_tokens: frozenset[int] | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass(frozen=True)
class TokenLogprob:
    """A token and its log-probability under the model (the log-softmax of its raw logits, in float32), with
    the `top` likeliest tokens there as (token, logprob), likeliest first. A prompt's first token, which
    nothing predicts, has None for both."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None = ()


@dataclass(frozen=True)
class Delta:
    """New text of sample `index` of a job. A sample's last delta has its `finish_reason` ("stop": a stop
    token or a stop string, "length": max_tokens) and `tokens` generated; an `error` ends the whole job.

    With `Sampling.logprobs`, `logprobs` has the tokens drawn since the sample's previous delta (a token
    whose text is held back waits for the next one), every drawn token once, its stop token included. With
    `prompt_logprobs`, each sample's first delta, at its prefill, has the prompt's in `prompt`."""

    index: int
    text: str
    finish_reason: str | None = None
    tokens: int = 0
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()
    prompt: tuple[TokenLogprob, ...] | None = None


class Job:
    """A prompt to complete `n` times. The engine calls `on_delta` from its own thread, so it must be quick
    and must not raise."""

    def __init__(self, prompt: list[int], n: int, sampling: Sampling, on_delta: Callable[[Delta], None]):
        self.prompt, self.n, self.sampling, self.on_delta = prompt, n, sampling, on_delta
        self.cancelled = False  # set by Engine.cancel, from any thread


class InvalidJob(ValueError):
    """A job this engine cannot run; `param` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class QueueFull(Exception):
    """The queue of waiting jobs is at its bound: the caller should come back later."""


class EngineStopped(Exception):
    """The engine is shutting down and takes no more jobs."""


def draw(logits: torch.Tensor, rows: list[tuple[Sampling, torch.Generator] | None]) -> list[int | None]:
    """One token for each row of `logits` (R, vocab) that has (sampling, generator); None for the others.

    Greedy rows take the argmax; the others draw from their filtered softmax by inverse CDF, with one uniform
    number from their own generator. The softmax and the cumulative sums of all rows are computed together:
    these kernels work row by row along the vocabulary, so a row's numbers depend neither on the other rows
    nor on their number (measured bit for bit from 1 to 16 rows); a row with top-k or top-p is filtered on its
    own. (`sample_next`'s torch.multinomial would draw an exponential per vocabulary entry and row: some 20x
    slower at GPT-2's 50257.)

    Total over the documented ranges, by `sample_next`'s rules: a temperature so small that the logits divided
    by it overflow (1e-40) draws the argmax, and `filter_logits` keeps the most likely token whatever top_p
    (1e-300), so such a row is greedy too.
    """
    temperatures = [[row[0].temperature or 1.0] if row else [1.0] for row in rows]
    scaled = logits.float() / torch.tensor(temperatures, device=logits.device)
    finite = overflow_free(scaled).tolist()
    greedy = logits.argmax(dim=-1).tolist()
    cdf = F.softmax(scaled, dim=-1).cumsum(-1, dtype=torch.float64)  # float64: no mass lost
    tokens: list[int | None] = []
    for i, row in enumerate(rows):
        if row is None or row[0].temperature == 0 or not finite[i]:
            tokens.append(None if row is None else greedy[i])
            continue
        sampling, generator = row
        row_cdf = cdf[i]
        if sampling.top_k is not None or (sampling.top_p or 1.0) < 1.0:
            filtered = filter_logits(scaled[i], sampling.top_k, sampling.top_p)
            row_cdf = F.softmax(filtered, dim=-1).cumsum(-1, dtype=torch.float64)
        u = torch.rand((), dtype=torch.float64, generator=generator, device=logits.device) * row_cdf[-1]
        # the first token whose cumulative mass passes u
        token = int(torch.searchsorted(row_cdf, u, right=True))
        # u rounds up to the total about once in 2^53 draws: then the last token with mass, never one without
        tokens.append(token if token < len(row_cdf) else int(torch.searchsorted(row_cdf, row_cdf[-1])))
    return tokens


def invariant_step_sizes(model: GPT, cache: SlotKVCache) -> tuple[int, ...]:
    """The row counts, among 1, 2, 4, 8, ... and the cache's number of slots, at which a decode step computes
    every row bit for bit as a step of all the slots does, wherever the row sits in it (docs/serving.md,
    "Numerics"). Empty if the rows of a step of all the slots differ among themselves.

    Which kernel computes a row, and so how it rounds, depends on the step's shape and the row's place in it,
    not on the numbers it holds: one step of each size, every row decoding the same sequence, measures it.
    The cache's slots must be free; they are free again after."""
    slots = len(cache.lengths)
    sizes = sorted({slots, *(1 << i for i in range(slots.bit_length()) if 1 << i < slots)})
    length = min(PROBE_TOKENS, model.config.block_size - 1)
    prompt = torch.arange(length, device=cache.k.device) % model.config.vocab_size
    model(prompt[None], kv_cache=cache.slot(0))
    cache.occupy(0, length)
    for slot in range(1, slots):
        cache.copy(0, slot)
    steps = {}
    for size in sizes:
        cache.rows = list(range(size))
        steps[size] = model(prompt[-1:].expand(size, 1), kv_cache=cache)[0][:, -1]
        for slot in cache.rows:
            cache.occupy(slot, length)  # forget the step
    for slot in range(slots):
        cache.free(slot)
    reference = steps[slots][0]
    return tuple(size for size in sizes if all(torch.equal(row, reference) for row in steps[size]))


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s entry from one row of log-softmaxed logits (vocab,), with the `top` likeliest tokens."""
    best: tuple[tuple[int, float], ...] = ()
    if top:
        values, ids = logprobs.topk(top)
        best = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return TokenLogprob(token, float(logprobs[token]), best)


def fingerprint(
    device: torch.device, dtype: torch.dtype, max_batch: int, batch_invariant: bool,
    draft: tuple[object, ...] = (),
) -> str:
    """OpenAI's `system_fingerprint`: what, besides the model and the request, can change the numbers (the
    versions, the device, the dtype, torch's threads, the batch's shape, a draft model and its K)."""
    what = (__version__, torch.__version__, str(device), str(dtype), torch.get_num_threads(), max_batch,
            batch_invariant, *draft)
    return "fp_" + hashlib.sha256(repr(what).encode()).hexdigest()[:12]


class StopStrings:
    """Text in, text out, cut at the first stop string: text that may be the start of one is held back until
    it is known not to be, so no stop string ever reaches the reader, even split across tokens."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = tuple(s for s in stops if s)
        self.held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """The text that is safe to hand out, and whether a stop string has ended the sample."""
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        if found:
            out, self.held = self.held[: min(found)], ""
            return out, True
        keep = max((n for s in self.stops for n in range(1, len(s)) if self.held.endswith(s[:n])), default=0)
        cut = len(self.held) - keep
        out, self.held = self.held[:cut], self.held[cut:]
        return out, False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclass
class _Sample:
    """One sample in a slot: where it is, how it draws, the text it holds back."""

    job: Job
    index: int
    slot: int
    generator: torch.Generator
    text: TextStream
    stops: StopStrings
    stop_tokens: frozenset[int]
    bias: torch.Tensor | None = None  # the job's logit_bias, as a row of the vocabulary
    counts: torch.Tensor | None = None  # how often it drew each token: what the penalties count
    tokens: int = 0
    last: int = 0  # the token fed at the next step
    logprobs: list[TokenLogprob] = field(default_factory=list)  # drawn, not yet handed out
    speculation: tuple[KVCache, KVCache] | None = None  # its target and draft caches, if it speculates
    sequence: list[int] = field(default_factory=list)  # the prompt and the tokens drawn, if it speculates

    def steered(self) -> bool:
        return self.bias is not None or self.counts is not None


class Engine:
    """The model, a cache of `max_batch` slots, a queue of at most `max_queue` waiting jobs, one decode
    thread.

    With `batch_invariant` a step feeds the busy slots and enough free ones to make one of `step_sizes` rows,
    the sizes at which every row rounds as in a step of all `max_batch` (measured at start), so a row's
    numbers never depend on which other rows are busy; otherwise only the busy slots (docs/serving.md).
    A `draft` model (the same tokenizer) makes the samples it can serve decode speculatively, proposing
    `draft_tokens` per round.
    """

    def __init__(
        self, model: GPT, tokenizer: Tokenizer, max_batch: int = 16, max_queue: int = 64,
        batch_invariant: bool = True, draft: GPT | None = None, draft_tokens: int = DRAFT_TOKENS,
    ):
        param = next(model.parameters())
        self.model, self.tokenizer, self.device = model, tokenizer, param.device
        self.max_batch, self.max_queue, self.batch_invariant = max_batch, max_queue, batch_invariant
        self.cache = SlotKVCache(model.config, max_batch, param.dtype, param.device)
        self.samples: list[_Sample | None] = [None] * max_batch
        self.waiting: deque[Job] = deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="gptforge-engine", daemon=True)
        self.speculator = None if draft is None else Speculator(model, draft, draft_tokens)
        self.draft_cache = None  # storage only: each speculating sample decodes through its slot's view
        speculation: tuple[object, ...] = ()
        if draft is not None:
            self.draft_cache = SlotKVCache(draft.config, max_batch, param.dtype, param.device)
            speculation = (repr(draft.config), draft.get_num_params(), draft_tokens)
        self.fingerprint = fingerprint(param.device, param.dtype, max_batch, batch_invariant, speculation)
        self.step_sizes = tuple(range(1, max_batch + 1))
        if batch_invariant:
            with torch.inference_mode():
                self.step_sizes = invariant_step_sizes(model, self.cache)
            if max_batch not in self.step_sizes:
                log.warning("the rows of a %d-row decode step round differently with their place in it: "
                            "--batch_invariant cannot keep its guarantee on this machine", max_batch)
                self.step_sizes = (max_batch,)

    # -- the caller's side: any thread --

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Fail whatever is still in flight or waiting, and end the decode thread."""
        with self.wake:
            self.stopping = True
            self.wake.notify()
        if self.thread.is_alive():
            self.thread.join()

    def submit(self, jobs: list[Job]) -> None:
        """Queue `jobs`, all or none: InvalidJob for a job that cannot run, QueueFull when the queue is
        full."""
        block_size, vocab_size = self.model.config.block_size, self.model.config.vocab_size
        if len(jobs) > self.max_queue:
            raise InvalidJob(
                f"at most {self.max_queue} prompts in one request (this server's queue)", "prompt"
            )
        for job in jobs:
            if not 1 <= job.n <= self.max_batch:
                raise InvalidJob(
                    f"n must be between 1 and {self.max_batch} (this server's batch), got {job.n}", "n"
                )
            if not job.prompt:
                raise InvalidJob("the prompt has no tokens", "prompt")
            if max(job.prompt) >= vocab_size or min(job.prompt) < 0:
                raise InvalidJob(
                    f"the prompt has token ids the {vocab_size}-token model does not know", "prompt"
                )
            if any(not 0 <= token < vocab_size for token, _ in job.sampling.logit_bias):
                raise InvalidJob(
                    f"logit_bias has token ids the {vocab_size}-token model does not know", "logit_bias"
                )
            if len(job.prompt) + job.sampling.max_tokens > block_size:
                raise InvalidJob(
                    f"This model's maximum context length is {block_size} tokens, however you requested "
                    f"{len(job.prompt) + job.sampling.max_tokens} tokens ({len(job.prompt)} in your prompt; "
                    f"{job.sampling.max_tokens} for the completion). "
                    "Please reduce your prompt or completion length.",
                    "max_tokens",
                )
        with self.wake:
            if self.stopping:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) + len(jobs) > self.max_queue:
                raise QueueFull(
                    f"{len(self.waiting)} requests are already waiting (the bound is {self.max_queue})"
                )
            self.waiting.extend(jobs)
            self.wake.notify()

    def cancel(self, job: Job) -> None:
        """Drop `job`: from the queue now, from its slots at the next step boundary."""
        job.cancelled = True
        with self.wake:
            if job in self.waiting:
                self.waiting.remove(job)
            self.wake.notify()

    def occupancy(self) -> dict[str, int]:
        """How busy the engine is: samples decoding, jobs waiting, slots in all."""
        busy = sum(sample is not None for sample in self.samples)
        return {"busy": busy, "waiting": len(self.waiting), "slots": self.max_batch}

    # -- the decode thread --

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self.wake:
                    while not (self.stopping or self.waiting or self._busy()):
                        self.wake.wait()
                    if self.stopping:
                        break
                self._drop_cancelled()
                self._admit()
                if self._busy():
                    try:
                        self._decode()
                    except Exception as e:  # a failed step must not take the server down: fail its jobs
                        log.exception("decode step failed")
                        self._fail(self._in_flight(), f"the engine failed: {type(e).__name__}: {e}")
        with self.wake:
            waiting = list(self.waiting)
            self.waiting.clear()
        self._fail(self._in_flight() + waiting, "the server is shutting down")

    def _busy(self) -> bool:
        return any(sample is not None for sample in self.samples)

    def _drop_cancelled(self) -> None:
        for sample in self.samples:
            if sample is not None and sample.job.cancelled:
                self._release(sample)

    def _admit(self) -> None:
        """Prefill waiting jobs, first come first served, while the first one's samples fit in free slots."""
        while True:
            with self.wake:
                free = [slot for slot, sample in enumerate(self.samples) if sample is None]
                if not self.waiting or len(free) < self.waiting[0].n:
                    return
                job = self.waiting.popleft()
            try:
                self._prefill(job, free[: job.n])
            except Exception as e:
                log.exception("prefill failed")
                self._fail([job], f"the engine failed: {type(e).__name__}: {e}")

    def _prefill(self, job: Job, slots: list[int]) -> None:
        """Run the prompt once, alone, into the first slot; the job's other samples start from copies of
        it."""
        sampling = job.sampling
        prompt = torch.tensor([job.prompt], device=self.device)
        prompt_logprobs = None
        if sampling.prompt_logprobs:  # the head at every position, not the last only
            hidden = self.model.hidden_states(prompt, kv_cache=self.cache.slot(slots[0]))
            logits = self.model.head(hidden[:, [-1]])
            prompt_logprobs = self._prompt_logprobs(job.prompt, hidden[0, :-1], sampling.logprobs or 0)
        else:
            logits, _ = self.model(prompt, kv_cache=self.cache.slot(slots[0]))
        self.cache.occupy(slots[0], len(job.prompt))
        if sampling.max_tokens == 0:  # scoring only: nothing to draw
            self.cache.free(slots[0])
            for index in range(job.n):
                job.on_delta(Delta(index, "", "length", 0, prompt=prompt_logprobs))
            return
        for slot in slots[1:]:
            self.cache.copy(slots[0], slot)
        stop_tokens = sampling.stop_tokens
        if stop_tokens is None:
            eot = self.tokenizer.eot_token
            stop_tokens = frozenset() if eot is None else frozenset({eot})
        vocab_size = logits.size(-1)
        bias = None
        if sampling.logit_bias:
            bias = torch.zeros(vocab_size, device=self.device)
            ids, values = zip(*sampling.logit_bias, strict=True)
            bias[list(ids)] = torch.tensor(values, device=self.device)
        penalized = bool(sampling.presence_penalty or sampling.frequency_penalty)
        samples = []
        for index, slot in enumerate(slots):
            generator = torch.Generator(device=self.device)
            if sampling.seed is None:
                generator.seed()
            else:  # sample i of seed s draws as sample 0 of seed s + i
                generator.manual_seed(sampling.seed + index)
            counts = torch.zeros(vocab_size, device=self.device) if penalized else None
            samples.append(_Sample(job, index, slot, generator, TextStream(self.tokenizer),
                                   StopStrings(sampling.stop), stop_tokens, bias, counts))
            if self.draft_cache is not None and self._speculates(sampling):  # the draft prefills later
                target = self.cache.slot(slot)
                target.pos = len(job.prompt)
                samples[-1].speculation = (target, self.draft_cache.slot(slot))
                samples[-1].sequence = list(job.prompt)
                self.cache.set_aside(slot, len(job.prompt))
            self.samples[slot] = samples[-1]
            if prompt_logprobs is not None:
                job.on_delta(Delta(index, "", prompt=prompt_logprobs))
        rows = [(sampling, s.generator) for s in samples]
        last = logits[:, -1]
        tokens = draw(self._steered(last.expand(len(samples), -1), samples), rows)
        # one row for all the samples: its shape is the prompt's alone
        logprobs = F.log_softmax(last.float(), dim=-1)[0] if sampling.logprobs is not None else None
        for sample, token in zip(samples, tokens, strict=True):
            assert token is not None
            entry = None if logprobs is None else token_logprob(logprobs, token, sampling.logprobs or 0)
            self._take(sample, token, entry)

    def _prompt_logprobs(self, prompt: list[int], hidden: torch.Tensor, top: int) -> tuple[TokenLogprob, ...]:
        """Each prompt token's logprob given the tokens before it, from the hidden states of the positions
        before it (evaluate.Scorer's way: the head in chunks, the log-softmax in float32)."""
        entries = [TokenLogprob(prompt[0], None, None)]
        step = max(1, HEAD_CHUNK // self.model.config.vocab_size)
        for start in range(0, len(prompt) - 1, step):
            logprobs = F.log_softmax(self.model.head(hidden[start:start + step]).float(), dim=-1)
            targets = prompt[start + 1:start + 1 + step]
            entries += [token_logprob(row, token, top) for row, token in zip(logprobs, targets, strict=True)]
        return tuple(entries)

    def _steered(self, logits: torch.Tensor, samples: list["_Sample | None"]) -> torch.Tensor:
        """The logits each row draws from: its logit_bias added, its penalties subtracted (OpenAI's formula:
        logit - count * frequency_penalty - (count > 0) * presence_penalty). Row by row, on a copy."""
        if not any(s is not None and s.steered() for s in samples):
            return logits
        logits = logits.float().clone(memory_format=torch.contiguous_format)  # a prefill's rows are one
        for row, sample in enumerate(samples):
            if sample is None:
                continue
            if sample.bias is not None:
                logits[row] += sample.bias
            if sample.counts is not None:
                sampling = sample.job.sampling
                logits[row] -= (sample.counts * sampling.frequency_penalty
                                + (sample.counts > 0).float() * sampling.presence_penalty)
        return logits

    @staticmethod
    def _speculates(sampling: Sampling) -> bool:
        """Whether a job's samples can decode speculatively: they report no logprobs and are not steered."""
        steered = sampling.logit_bias or sampling.presence_penalty or sampling.frequency_penalty
        return sampling.logprobs is None and not steered

    def _decode(self) -> None:
        """One step: a token for every busy slot that decodes plainly, in one forward, then a round for each
        sample that speculates, one after the other."""
        plain = [s if s is not None and s.speculation is None else None for s in self.samples]
        speculating = [s for s in self.samples if s is not None and s.speculation is not None]
        if any(s is not None for s in plain):
            self._step(plain)
        for sample in speculating:
            self._speculate(sample)

    def _speculate(self, sample: _Sample) -> None:
        """A round of speculative decoding for `sample`: one token or more, handed out one by one."""
        assert self.speculator is not None and sample.speculation is not None
        sampling = sample.job.sampling
        seq = torch.tensor([sample.sequence], device=self.device)
        tokens = self.speculator.round(seq, sample.speculation, sampling.max_tokens - sample.tokens,
                                       sampling.temperature, sampling.top_k, sampling.top_p, sample.generator)
        self.cache.set_aside(sample.slot, sample.speculation[0].pos)
        for token in tokens:
            self._take(sample, token)
            if self.samples[sample.slot] is not sample:  # it ended
                return

    def _step(self, by_slot: list[_Sample | None]) -> None:
        """One token for every sample of `by_slot` (the slots in order; None: a slot to leave alone), in one
        forward of the smallest of `step_sizes` rows that holds them, free slots filling it up."""
        busy = [slot for slot, sample in enumerate(by_slot) if sample is not None]
        size = next(size for size in self.step_sizes if size >= len(busy))
        rows = busy + [slot for slot, sample in enumerate(by_slot) if sample is None][: size - len(busy)]
        self.cache.rows = rows
        samples = [by_slot[slot] for slot in rows]
        last = [[sample.last if sample is not None else 0] for sample in samples]
        logits, _ = self.model(torch.tensor(last, device=self.device), kv_cache=self.cache)
        draws = [(s.job.sampling, s.generator) if s is not None else None for s in samples]
        tokens = draw(self._steered(logits[:, -1], samples), draws)
        for row, (sample, token) in enumerate(zip(samples, tokens, strict=True)):
            if sample is not None and token is not None:
                top, entry = sample.job.sampling.logprobs, None
                if top is not None:  # the row alone, as the draw: its numbers are its own
                    entry = token_logprob(F.log_softmax(logits[row, -1].float(), dim=-1), token, top)
                self._take(sample, token, entry)

    def _take(self, sample: _Sample, token: int, entry: TokenLogprob | None = None) -> None:
        """Append `token` to the sample and hand out what text it completes; end the sample where it ends."""
        sampling = sample.job.sampling
        sample.tokens += 1
        sample.last = token
        if sample.speculation is not None:
            sample.sequence.append(token)
        if entry is not None:
            sample.logprobs.append(entry)
        if sample.counts is not None:
            sample.counts[token] += 1
        stop_token = token in sample.stop_tokens
        ended = stop_token or sample.tokens == sampling.max_tokens
        new = "" if stop_token else sample.text.push(token)
        if ended:
            new += sample.text.flush()
        text, stopped = sample.stops.push(new)
        if stopped or ended:
            self._release(sample)
            reason = "stop" if stopped or stop_token else "length"
            text += "" if stopped else sample.stops.flush()
            handed = self._handed(sample)
            sample.job.on_delta(Delta(sample.index, text, reason, sample.tokens, logprobs=handed))
        elif text:
            sample.job.on_delta(Delta(sample.index, text, logprobs=self._handed(sample)))

    @staticmethod
    def _handed(sample: _Sample) -> tuple[TokenLogprob, ...]:
        """The logprobs the sample's next delta carries: all those not yet handed out."""
        out = tuple(sample.logprobs)
        sample.logprobs.clear()
        return out

    def _release(self, sample: _Sample) -> None:
        self.cache.free(sample.slot)
        self.samples[sample.slot] = None

    def _in_flight(self) -> list[Job]:
        return list({id(sample.job): sample.job for sample in self.samples if sample is not None}.values())

    def _fail(self, jobs: list[Job], message: str) -> None:
        """End `jobs` with an error delta, freeing their slots."""
        for sample in self.samples:
            if sample is not None and any(sample.job is job for job in jobs):
                self._release(sample)
        for job in jobs:
            job.on_delta(Delta(0, "", error=message))
