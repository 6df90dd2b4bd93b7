"""The training loop: from scratch, from GPT-2 or resumed, on one process or many (torchrun).

This module wires the pieces (config, data, model, optimizer, distributed, checkpoint, metrics) and runs the
loop; each piece lives in its own module. One step: set the LR, evaluate and checkpoint on schedule, then
`gradient_accumulation_steps` micro-steps of forward/backward over the step's global batch, clip, update.

Iteration `it` trains on global batch `it` (a pure function of seed and `it`, split over the processes) and a
checkpoint taken at iteration N holds the state before step N, RNG states included, so a resumed run repeats
exactly what an uninterrupted one would have done. It reads prepared token files (data/files.py, batches.py)
and never text, HTTP or the prepare side.
"""

import contextlib
import dataclasses
import json
import math
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from tqdm import tqdm

from gptforge import __version__
from gptforge import distributed as distrib
from gptforge.atomic import atomic_write_text, check_writable
from gptforge.checkpoint import (
    clean_state_dict,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    saved_model_args,
    set_rng_state,
)
from gptforge.config import TrainConfig, load_train_config
from gptforge.data import TokenData
from gptforge.data.files import locate
from gptforge.data.mixture import Mixture
from gptforge.device import (
    describe_choices,
    device_type,
    enable_tf32,
    keep_freed_memory,
    resolve_compile,
    resolve_device,
    resolve_dtype,
    torch_dtype,
)
from gptforge.errors import GptforgeError, asked_memory
from gptforge.flops import PEAK_UNKNOWN, peak_flops_per_sec
from gptforge.memory import oom_message, plan_memory
from gptforge.metrics import MetricsLog
from gptforge.model import GPT, MODEL_KEYS, GPTConfig
from gptforge.optim import build_optimizer, cosine_lr, wsd_lr
from gptforge.tokenizer import check_token_ids


class TrainingData(Protocol):
    """What the trainer draws from: a prepared dataset (`data.TokenData`) or conversations
    (`data.conversations.ConversationData`)."""

    name: str
    vocab_size: int  # ids in the data are below it
    padded_vocab: bool  # a model from scratch pads the vocabulary to 50304 (GPT-2's BPE)

    def batches(self, split: str, block_size: int, batch_size: int, **kwargs: Any) -> Any: ...

    def checkpoint_fields(self) -> dict[str, Any]: ...


FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclasses.dataclass
class Progress:
    """What the loop has done so far; saved in every checkpoint."""

    iter_num: int = 0
    best_val_loss: float = math.inf
    elapsed_s: float = 0.0  # wall time of training steps, compile included, eval and checkpoints excluded


def run_config(files: list[str], overrides: dict[str, Any],
               defaults: TrainConfig | None = None) -> TrainConfig:
    """The config of a `gptforge train` (or `sft`, with its `defaults`) command line. A resumed run starts
    from the config it was saved with, so `--init_from=resume --out_dir=DIR` alone continues it; files and
    overrides then change what they name."""
    defaults = defaults or TrainConfig()
    # which run: a resumed run's other options are checked against its saved config, not against the defaults
    where = load_train_config(files, {k: v for k, v in overrides.items() if k in ("init_from", "out_dir")},
                              base=defaults)
    if where.init_from != "resume":
        return load_train_config(files, overrides, base=defaults)
    ckpt = load_checkpoint(where.out_dir, which="latest")
    saved = {**(ckpt.get("config") or {}), **saved_model_args(ckpt)}  # a nanoGPT config lacks gptforge's keys
    names = {f.name for f in dataclasses.fields(defaults)}
    base = type(defaults)(**{k: v for k, v in saved.items() if k in names})
    return load_train_config(files, {**overrides, "init_from": "resume", "out_dir": where.out_dir}, base=base)


def train(cfg: TrainConfig) -> Progress:
    """Run training as `cfg` says; under torchrun, every process calls this. Returns where it ended."""
    device = resolve_device(cfg.device)
    d = distrib.setup(device, cfg.backend)
    try:
        asked = (cfg.device, cfg.dtype, cfg.compile)
        cfg = dataclasses.replace(cfg, device=d.device, dtype=resolve_dtype(cfg.dtype, d.device),
                                  compile=resolve_compile(cfg.compile, d.device))
        if d.is_main:
            print(describe_choices(asked, cfg.device, cfg.dtype, cfg.compile))
        return Trainer(cfg, d).run()
    finally:
        distrib.teardown()


class Trainer:
    """The state of one training run; `run()` is the loop."""

    def __init__(
        self, cfg: TrainConfig, d: distrib.Dist, data: TrainingData | None = None, model: GPT | None = None,
        extra: dict[str, Any] | None = None,
    ):
        """`data` defaults to the prepared dataset DATA_DIR/DATASET (or the mixture DATA_MIX) and `model` to
        what `init_from` names;
        `extra` goes into every checkpoint (what a finetuning run must remember, such as its base)."""
        if cfg.gradient_accumulation_steps % d.world_size:
            raise GptforgeError(
                f"--gradient_accumulation_steps={cfg.gradient_accumulation_steps} is not divisible by the "
                f"{d.world_size} processes; use a multiple of {d.world_size}"
            )
        self.cfg, self.d = cfg, d
        self.out_dir = Path(cfg.out_dir)
        self.accum = cfg.gradient_accumulation_steps // d.world_size  # micro-steps per process
        self.device_type = device_type(cfg.device)
        self.ptdtype = torch_dtype(cfg.dtype)
        if self.device_type == "cuda":
            enable_tf32()
        if self.device_type == "cpu":
            keep_freed_memory()
        self.autocast = (
            torch.autocast(device_type=self.device_type, dtype=self.ptdtype)
            if self.ptdtype != torch.float32 and self.device_type in ("cuda", "cpu")
            else contextlib.nullcontext()
        )

        if d.is_main:
            check_writable(self.out_dir, "--out_dir")
        self.data = data or self._token_data()
        self.extra = extra or {}
        global_rows = cfg.batch_size * cfg.gradient_accumulation_steps
        self.batches = self.data.batches("train", cfg.block_size, global_rows, seed=cfg.seed, rank=d.rank,
                                         world_size=d.world_size, device=cfg.device,
                                         prefetch=self.device_type == "cuda")
        self.tokens_per_iter = global_rows * cfg.block_size

        ckpt = load_checkpoint(self.out_dir, which="latest") if cfg.init_from == "resume" else None
        # the same initial weights on every process (FSDP shards them as they are)
        torch.manual_seed(cfg.seed)
        self.raw = (model or self._build_model(ckpt)).to(cfg.device)
        self._seed_everything()
        check_token_ids(self.data.vocab_size - 1, self.raw.config.vocab_size, f"dataset {self.data.name}")
        # a run that trains part of its model (LoRA adapters) checkpoints only that part
        self.trained = {name for name, p in self.raw.named_parameters() if p.requires_grad}
        self.partial = len(self.trained) < len(dict(self.raw.named_parameters()))
        self.raw.activation_checkpointing = cfg.activation_checkpointing
        self.wrapped = distrib.wrap_model(self.raw, d, cfg.parallelism)
        self.optimizer = build_optimizer(
            self.raw, cfg.optimizer, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
            self.device_type, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum, embed_lr=cfg.embed_lr,
            head_lr=cfg.head_lr,
        )
        self.scaler = torch.amp.GradScaler(self.device_type, enabled=cfg.dtype == "float16")
        self.memory = plan_memory(self.raw, self.optimizer, cfg.batch_size, cfg.block_size,
                                  self.compute_dtype(), cfg.activation_checkpointing)
        self.peak_flops = peak_flops_per_sec(torch.device(cfg.device), self.compute_dtype(), cfg.peak_tflops)
        self.progress = Progress()
        if ckpt is not None:
            self._restore(ckpt)
        self.model: nn.Module = (torch.compile(self.wrapped, mode=cfg.compile_mode) if cfg.compile
                                 else self.wrapped)

    # -- set-up --

    def _token_data(self) -> TrainingData:
        cfg = self.cfg
        if cfg.data_mix:
            return Mixture(cfg.data_mix, cfg.data_dir, cfg.block_size, cfg.align_rows)
        directory, meta = locate(cfg.data_dir, cfg.dataset)
        return TokenData(directory, cfg.block_size, meta=meta, align_rows=cfg.align_rows)

    def _seed_everything(self) -> None:
        """Per-rank seeds, so dropout differs across processes while each run repeats exactly."""
        seed = self.cfg.seed + self.d.rank
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)

    def _build_model(self, ckpt: dict[str, Any] | None) -> GPT:
        cfg = self.cfg
        if ckpt is not None:
            saved = GPTConfig.from_dict({**saved_model_args(ckpt), "dropout": cfg.dropout})
            changed = {k: (getattr(saved, k), getattr(cfg, k)) for k in MODEL_KEYS
                       if getattr(saved, k) != getattr(cfg, k)}
            if changed:
                diffs = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changed.items())
                raise GptforgeError(
                    f"cannot resume {self.out_dir}: the config changes the model shape ({diffs})"
                )
            return GPT(saved)
        if cfg.init_from == "scratch":
            # GPT-2's 50257 tokens padded to 50304 (a multiple of 64) for speed, as nanoGPT; others as they
            # are
            vocab_size = 50304 if self.data.padded_vocab else self.data.vocab_size
            return GPT(cfg.model_config(vocab_size))
        model = GPT.from_pretrained(cfg.init_from, override_args={"dropout": cfg.dropout})
        if cfg.block_size < model.config.block_size:
            model.crop_block_size(cfg.block_size)
        elif cfg.block_size > model.config.block_size:
            raise GptforgeError(
                f"--block_size={cfg.block_size} exceeds {cfg.init_from}'s {model.config.block_size}"
            )
        # the run's config records the shape it really trains
        self.cfg = dataclasses.replace(cfg, **{k: getattr(model.config, k) for k in MODEL_KEYS})
        return model

    def _restore(self, ckpt: dict[str, Any]) -> None:
        if "progress" not in ckpt:
            return self._restore_nanogpt(ckpt)
        base_lrs = [group["base_lr"] for group in self.optimizer.param_groups]
        set_state_dict(self.wrapped, self.optimizer, model_state_dict=ckpt["model"],
                       optim_state_dict=ckpt["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=not self.partial))
        # the saved groups carry the old run's peak LRs; this run's options decide them (e.g. a new
        # --learning_rate)
        for group, base_lr in zip(self.optimizer.param_groups, base_lrs, strict=True):
            group["base_lr"] = base_lr
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.batches.load_state_dict(ckpt["data"])
        self.progress = Progress(**ckpt["progress"])
        rng = ckpt["rng"]
        if len(rng) == self.d.world_size:
            set_rng_state(rng[self.d.rank])
        elif self.d.is_main:
            tqdm.write(f"resuming on {self.d.world_size} processes from {len(rng)}: RNG streams start afresh")

    def _restore_nanogpt(self, ckpt: dict[str, Any]) -> None:
        """A run of nanoGPT's train.py: its weights, its AdamW state where this run's optimizer is the same
        (nanoGPT's groups are `configure_optimizers`' own) and its iteration. It saved no data position or RNG
        states: batches continue from its iteration, and the random streams start afresh."""
        set_model_state_dict(self.wrapped, clean_state_dict(ckpt["model"]),
                             options=StateDictOptions(full_state_dict=True))
        restored = "its weights"
        optimizer_state = ckpt.get("optimizer")
        if self.cfg.optimizer == "adamw" and self.cfg.parallelism == "ddp" and optimizer_state:
            base_lrs = [group["base_lr"] for group in self.optimizer.param_groups]
            try:
                self.optimizer.load_state_dict(optimizer_state)
                restored += " and AdamW state"
            except (ValueError, KeyError) as e:
                warnings.warn(f"nanoGPT's optimizer state does not fit this model's ({e}); AdamW starts "
                              "afresh", stacklevel=1)
            for group, base_lr in zip(self.optimizer.param_groups, base_lrs, strict=True):
                group["base_lr"] = base_lr
        self.progress = Progress(iter_num=int(ckpt.get("iter_num", 0)),
                                 best_val_loss=float(ckpt.get("best_val_loss", math.inf)))
        if self.d.is_main:
            tqdm.write(f"resuming nanoGPT's run at iter {self.progress.iter_num}: {restored}; it saved no "
                       "data position or RNG state, so batches and random streams differ from an "
                       "uninterrupted run")

    # -- the loop --

    def run(self) -> Progress:
        cfg, d, p = self.cfg, self.d, self.progress
        if d.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            resolved = dataclasses.asdict(cfg)
            atomic_write_text(self.out_dir / "config.json", json.dumps(resolved, indent=2) + "\n")
            print(f"config: {self.out_dir / 'config.json'}")
            print(f"tokens per iteration: {self.tokens_per_iter:,} "
                  f"({cfg.batch_size} x {cfg.block_size} x {cfg.gradient_accumulation_steps} "
                  "accumulation steps)")
            print(f"model: {self.raw.get_num_params() / 1e6:.2f}M parameters, device {cfg.device}, "
                  f"{cfg.dtype}, {d.world_size} process(es), {cfg.parallelism if d.enabled else 'single'}")
            print(self.memory.describe())
            if self.peak_flops is None:
                print(f"mfu: {PEAK_UNKNOWN} (device {cfg.device})")
        log = (MetricsLog(self.out_dir, resume_iter=p.iter_num if cfg.init_from == "resume" else None)
               if d.is_main else None)
        wandb = self._wandb() if cfg.wandb_log and d.is_main else None
        stop = {"requested": False}
        previous_handlers = {sig: signal.signal(sig, lambda *_: stop.update(requested=True))
                             for sig in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=cfg.max_iters, initial=p.iter_num, disable=None if d.is_main else True, desc="train",
                   dynamic_ncols=True)
        running_mfu = -1.0
        # its eval is in the checkpoint already
        resumed_at = p.iter_num if cfg.init_from == "resume" else None
        try:
            while True:
                it = p.iter_num
                factor = self.lr_factor(it)
                for group in self.optimizer.param_groups:
                    group["lr"] = group["base_lr"] * factor
                lr = cfg.learning_rate * factor
                final = it >= cfg.max_iters
                if final and it == resumed_at:
                    bar.write(f"{cfg.out_dir} is already at iter {it}; pass a larger --max_iters to train on")
                    break
                scheduled = it % cfg.eval_interval == 0 and it != resumed_at
                if scheduled or final or cfg.eval_only:
                    self._eval_and_save(log, wandb, lr, running_mfu, final=final)
                    if cfg.eval_only or final:
                        break
                if distrib.any_rank(stop["requested"], d):
                    self._save(best=False)
                    bar.write(f"stopped at iter {it}; continue with --init_from=resume "
                              f"--out_dir={cfg.out_dir}")
                    break

                t0 = time.perf_counter()
                loss = self.step()
                if it % cfg.log_interval == 0:
                    loss_value = distrib.all_reduce_mean(loss, d).item()  # also waits for the step to finish
                t1 = time.perf_counter()
                dt = t1 - t0
                p.elapsed_s += dt
                p.iter_num += 1
                bar.update(1)
                if it % cfg.log_interval == 0:
                    if not math.isfinite(loss_value):
                        raise GptforgeError(
                            f"the training loss became {loss_value} at iter {it}; stopped without saving, "
                            f"the last checkpoint in {cfg.out_dir} is intact (try a lower --learning_rate or "
                            "--dtype=bfloat16)"
                        )
                    if it >= 5:  # let the first iterations (compilation) pass
                        mfu = self.raw.estimate_mfu(cfg.batch_size * self.accum, dt,
                                                    dtype=self.compute_dtype(), peak_flops=self.peak_flops)
                        if mfu is not None:
                            running_mfu = mfu if running_mfu < 0 else 0.9 * running_mfu + 0.1 * mfu
                    self._log_step(log, bar, it, loss_value, lr, dt, running_mfu)
        except torch.OutOfMemoryError as e:
            if self.device_type != "cuda":
                raise
            available = torch.cuda.get_device_properties(cfg.device).total_memory
            raise GptforgeError(oom_message(self.memory, available, cfg.gradient_accumulation_steps,
                                            d.world_size, asked_memory(e))) from None
        finally:
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            bar.close()
            if log is not None:
                log.close()
            if wandb is not None:
                wandb.finish()
            self.batches.close()
        return p

    def lr_factor(self, it: int) -> float:
        """The schedule at iteration `it` as a fraction of the peak: every param group's LR is its peak
        times it."""
        cfg = self.cfg
        if not cfg.decay_lr:
            return 1.0
        floor = cfg.min_lr / cfg.learning_rate
        if cfg.lr_schedule == "wsd":
            return wsd_lr(it, 1.0, cfg.warmup_iters, cfg.max_iters, cfg.cooldown_frac, floor)
        return cosine_lr(it, 1.0, cfg.warmup_iters, cfg.lr_decay_iters, floor)

    def step(self) -> torch.Tensor:
        """One optimizer step over this process's share of the global batch; returns its mean loss."""
        cfg = self.cfg
        x_all, y_all = self.batches.get(self.progress.iter_num)
        weights = self.batches.loss_weights(self.progress.iter_num, self.accum)
        total = torch.zeros((), device=cfg.device)
        for micro in range(self.accum):
            rows = slice(micro * cfg.batch_size, (micro + 1) * cfg.batch_size)
            distrib.set_grad_sync(self.wrapped, micro == self.accum - 1)
            with self.autocast:
                _, loss = self.model(x_all[rows], y_all[rows])
                # the gradient of the mean over all micro-steps (over all target tokens, if rows differ)
                loss = loss / self.accum if weights is None else loss * weights[micro]
            self.scaler.scale(loss).backward()
            total += loss.detach()
        if cfg.grad_clip != 0.0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.raw.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    @torch.no_grad()
    def _estimate_loss(self) -> dict[str, float]:
        """Mean loss over `eval_iters` batches of `batch_size` rows per split: the same batches at every eval
        and whatever the number of processes, which share them out (batch k goes to rank k % world_size).
        A mixture's sources are also evaluated one by one on their val splits ("val/NAME")."""
        cfg, d = self.cfg, self.d
        self.model.eval()
        out = {}
        evals = [("train", "train", self.data, cfg.seed + 1), ("val", "val", self.data, cfg.seed)]
        evals += [(f"val/{name}", "val", source, cfg.seed)
                  for name, source in getattr(self.data, "sources", {}).items()]
        for key, split, data, seed in evals:
            batches = data.batches(split, cfg.block_size, cfg.batch_size, seed=seed, device=cfg.device)
            total = torch.zeros(2, device=cfg.device)  # sum of batch losses, number of batches
            for k in range(d.rank, cfg.eval_iters, d.world_size):
                x, y = batches.get(k)
                with self.autocast:
                    _, loss = self.model(x, y)
                total += torch.stack([loss.float(), torch.ones((), device=cfg.device)])
            loss_sum, count = distrib.all_reduce_sum(total, d).tolist()
            out[key] = loss_sum / count
        self.model.train()
        return out

    def _eval_and_save(self, log: MetricsLog | None, wandb: Any, lr: float, mfu: float, final: bool) -> None:
        cfg, p = self.cfg, self.progress
        losses = self._estimate_loss()
        if self.d.is_main:
            sources = {k.removeprefix("val/"): v for k, v in losses.items() if k.startswith("val/")}
            each = f" ({', '.join(f'{name} {v:.4f}' for name, v in sources.items())})" if sources else ""
            tqdm.write(f"step {p.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                       f"{each}")
            if log is not None:
                log.write({"iter": p.iter_num, "elapsed_s": p.elapsed_s, "train_loss": losses["train"],
                           "val_loss": losses["val"], **{f"val_loss/{n}": v for n, v in sources.items()}})
            if wandb is not None:
                wandb.log({"iter": p.iter_num, "train/loss": losses["train"], "val/loss": losses["val"],
                           **{f"val/loss/{n}": v for n, v in sources.items()}, "lr": lr, "mfu": mfu * 100})
        if not all(math.isfinite(v) for v in losses.values()):
            raise GptforgeError(
                f"the eval loss became non-finite at iter {p.iter_num}; stopped without saving, the last "
                f"checkpoint in {cfg.out_dir} is intact (try a lower --learning_rate)"
            )
        if cfg.eval_only:
            return
        improved = losses["val"] < p.best_val_loss
        if improved:
            p.best_val_loss = losses["val"]
        if p.iter_num > 0 and (improved or cfg.always_save_checkpoint or final):
            self._save(best=improved)

    def _save(self, best: bool) -> None:
        """Checkpoint the state before step `iter_num` (all processes take part, rank 0 writes)."""
        model_state, optim_state = get_state_dict(self.wrapped, self.optimizer, options=FULL_STATE)
        if self.partial:
            model_state = {k: v for k, v in model_state.items() if k in self.trained}
        rng = distrib.gather(rng_state(), self.d)
        if self.d.is_main:
            payload = {
                "model_args": dataclasses.asdict(self.raw.config),
                "model": model_state,
                "optimizer": optim_state,
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                "config": dataclasses.asdict(self.cfg),
                "progress": dataclasses.asdict(self.progress),
                "iter_num": self.progress.iter_num,
                "best_val_loss": self.progress.best_val_loss,
                "data": self.batches.state_dict() | {"step": self.progress.iter_num},
                "rng": rng,
                **self.data.checkpoint_fields(),
                **self.extra,
                "gptforge_version": __version__,
            }
            save_checkpoint(self.out_dir, payload, best=best, keep_last=self.cfg.keep_last)
        distrib.barrier(self.d)

    # -- logging --

    def compute_dtype(self) -> torch.dtype:
        """The dtype the matmuls run in, which sets the peak FLOPS that MFU divides by."""
        return self.ptdtype if not isinstance(self.autocast, contextlib.nullcontext) else torch.float32

    def _log_step(self, log: MetricsLog | None, bar: tqdm, it: int, loss: float, lr: float, dt: float,
                  mfu: float) -> None:
        if not self.d.is_main:
            return
        tokens_per_sec = self.tokens_per_iter / dt
        mfu_text = f", mfu {mfu * 100:.2f}%" if mfu >= 0 else ""
        if bar.disable:  # no terminal to draw a bar on (a log file, a pipe): a line per log_interval
            tqdm.write(f"iter {it}: loss {loss:.4f}, lr {lr:.3e}, time {dt * 1000:.2f}ms, "
                       f"{tokens_per_sec:,.0f} tok/s{mfu_text}")
        else:  # the bar carries the latest step; evaluations still print their lines above it
            bar.set_postfix_str(f"loss {loss:.4f}, lr {lr:.2e}, {tokens_per_sec:,.0f} tok/s{mfu_text}",
                                refresh=False)
        if log is not None:
            log.write({"iter": it, "loss": loss, "lr": lr, "dt_ms": dt * 1000,
                       "tokens_per_sec": tokens_per_sec, "elapsed_s": self.progress.elapsed_s,
                       "mfu": mfu if mfu >= 0 else None})

    def _wandb(self) -> Any:
        try:
            import wandb
        except ImportError:
            raise GptforgeError("--wandb_log=True needs wandb: pip install 'gptforge[wandb]'") from None
        wandb.init(project=self.cfg.wandb_project, name=self.cfg.wandb_run_name,
                   config=dataclasses.asdict(self.cfg))
        return wandb
