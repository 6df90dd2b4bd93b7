"""`gptforge bench`: how fast the trainer's step runs for a model shape, as nanoGPT's bench.py measures it.

The step timed is the trainer's own (`train.Trainer`: data sampling, gradient accumulation, mixed precision,
torch.compile, clipping, fused AdamW), so a number here is what `gptforge train` gets with the same options.
Burn-in steps (compilation, allocator warm-up) run first and are not timed; then each timed step is waited for
(`loss.item()`, as a training log line does). Data are a prepared dataset or, without one, uniform random
GPT-2 token ids written to a temporary dataset. Its options are the training options (every key of
`TrainConfig`, with a benchmark's defaults) plus its own. `--profile=True` records the timed steps with the
PyTorch profiler as a trace for TensorBoard or Perfetto (the profiler slows them: time without it).
"""

import contextlib
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gptforge.config import TrainConfig
from gptforge.data import Meta
from gptforge.device import resolve_compile, resolve_device, resolve_dtype
from gptforge.distributed import Dist
from gptforge.errors import GptforgeError
from gptforge.flops import PEAK_UNKNOWN
from gptforge.options import option
from gptforge.tokenizer import GPT2Tokenizer
from gptforge.train import Trainer

RANDOM_TOKENS = 1 << 20  # tokens of random data; batches are drawn from it at random offsets


@dataclass
class BenchOptions(TrainConfig):
    """The training options whose step is timed (defaults: GPT-2 124M, one micro-step, random tokens), and the
    benchmark's own."""

    gradient_accumulation_steps: int = option(1, "micro-steps per step")
    dataset: str | None = option(None, "a prepared dataset (None: random GPT-2 tokens)")
    burn_in: int = option(10, "untimed steps first (compilation, warm-up)")
    steps: int = option(20, "timed steps")
    profile: bool = option(False, "record the timed steps with the torch profiler")
    profile_dir: str = option("bench_log", "where --profile writes its trace")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.burn_in < 0:
            raise GptforgeError(
                f"--steps must be >= 1 and --burn_in >= 0, got {self.steps} and {self.burn_in}"
            )


@dataclass
class BenchResult:
    """The timed steps: mean and median step time, throughput,
    MFU (None where the device's peak is unknown)."""

    ms_per_iter: float
    median_ms: float
    tokens_per_sec: float
    mfu: float | None
    losses: list[float]
    planned_bytes: int  # the memory plan's estimate for the step (memory.py)
    trace: Path | None = None


def train_config(opts: BenchOptions, data_dir: str, dataset: str) -> TrainConfig:
    """The training config whose step the benchmark times."""
    shared = {f.name: getattr(opts, f.name) for f in dataclasses.fields(TrainConfig)}
    device = resolve_device(opts.device)
    return TrainConfig(**{**shared, "data_dir": data_dir, "dataset": dataset, "device": device,
                          "dtype": resolve_dtype(opts.dtype, device),
                          "compile": resolve_compile(opts.compile, device), "init_from": "scratch"})


def write_random_dataset(directory: Path) -> None:
    """Uniform random GPT-2 token ids as a dataset (train and val),
    so the trainer reads them like any other."""
    tokens = np.random.default_rng(0).integers(0, GPT2Tokenizer.vocab_size, RANDOM_TOKENS, dtype=np.uint16)
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "val"):
        tokens.tofile(directory / f"{split}.bin")
    Meta(tokenizer={"kind": "gpt2"}, vocab_size=GPT2Tokenizer.vocab_size, dtype="uint16",
         tokens={"train": RANDOM_TOKENS, "val": RANDOM_TOKENS}, dataset="random").write(directory)


def bench(opts: BenchOptions) -> BenchResult:
    """Time `opts.steps` training steps after `opts.burn_in` untimed ones; prints as it goes."""
    with tempfile.TemporaryDirectory(prefix="gptforge-bench-") as tmp:
        if opts.dataset is None:
            write_random_dataset(Path(tmp) / "random")
            cfg = train_config(opts, tmp, "random")
        else:
            cfg = train_config(opts, opts.data_dir, opts.dataset)
        trainer = Trainer(dataclasses.replace(cfg, out_dir=tmp), Dist(device=cfg.device))
        data = f"{cfg.data_dir}/{cfg.dataset}" if opts.dataset else "random tokens"
        print(f"model: {trainer.raw.get_num_params() / 1e6:.2f}M parameters, "
              f"{trainer.tokens_per_iter:,} tokens per step, {data}, device {cfg.device}, {cfg.dtype}, "
              f"compile {cfg.compile}")
        print(trainer.memory.describe())
        try:
            return _run(trainer, opts)
        finally:
            trainer.batches.close()


def _run(trainer: Trainer, opts: BenchOptions) -> BenchResult:
    times, losses = [], []
    with _profiler(opts, trainer.cfg.device) as prof:
        for k in range(opts.burn_in + opts.steps):
            t0 = time.perf_counter()
            loss = trainer.step().item()  # waits for the step, as the trainer's log line does
            dt = time.perf_counter() - t0
            trainer.progress.iter_num += 1  # the next step's batch (and the prefetch of the one after)
            if prof is not None:
                prof.step()
            if k < opts.burn_in:
                print(f"burn-in {k + 1}/{opts.burn_in}: loss {loss:.4f}, {dt * 1000:.2f}ms")
                continue
            times.append(dt)
            losses.append(loss)
            print(f"step {len(times)}/{opts.steps}: loss {loss:.4f}, {dt * 1000:.2f}ms")
    mean = sum(times) / len(times)
    mfu = trainer.raw.estimate_mfu(trainer.cfg.batch_size * trainer.accum, mean,
                                   dtype=trainer.compute_dtype(), peak_flops=trainer.peak_flops)
    result = BenchResult(ms_per_iter=mean * 1000, median_ms=statistics.median(times) * 1000,
                         tokens_per_sec=trainer.tokens_per_iter / mean, mfu=mfu, losses=losses,
                         planned_bytes=trainer.memory.total,
                         trace=_newest_trace(opts) if opts.profile else None)
    mfu_text = f"{mfu * 100:.2f}%" if mfu is not None else f"unknown ({PEAK_UNKNOWN})"
    print(f"time per iteration: {result.ms_per_iter:.2f}ms (median {result.median_ms:.2f}ms), "
          f"{result.tokens_per_sec:,.0f} tokens/s, MFU {mfu_text}")
    if result.trace is not None:
        print(f"profiler trace: {result.trace}")
    return result


@contextlib.contextmanager
def _profiler(opts: BenchOptions, device: str) -> Iterator[torch.profiler.profile | None]:
    """The torch profiler over the timed steps (the burn-in is its warm-up), or None without --profile."""
    if not opts.profile:
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule, tensorboard_trace_handler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    wait = max(opts.burn_in - 1, 0)
    with profile(activities=activities, on_trace_ready=tensorboard_trace_handler(opts.profile_dir),
                 schedule=schedule(wait=wait, warmup=opts.burn_in - wait, active=opts.steps,
                                   repeat=1)) as prof:
        yield prof


def _newest_trace(opts: BenchOptions) -> Path | None:
    traces = sorted(Path(opts.profile_dir).glob("*.pt.trace.json"), key=lambda p: p.stat().st_mtime)
    return traces[-1] if traces else None
