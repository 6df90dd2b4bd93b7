"""Tests for gptforge.memory (the memory plan) and activation checkpointing: the plan's activations against
the tensors autograd really keeps, its state against the model's and optimizer's, the size it proposes when a
GPU runs out, and checkpointed gradients against plain ones.

    .venv/bin/python -m pytest tests/test_memory.py
"""

import contextlib
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config
from tiny_run import DATASET, char_dataset

from gptforge import GPT
from gptforge.config import TrainConfig
from gptforge.distributed import Dist
from gptforge.errors import GptforgeError
from gptforge.memory import GIB, MemoryPlan, activation_bytes_per_token, oom_message, plan_memory
from gptforge.optim import build_optimizer
from gptforge.train import Trainer

VOCAB = 512


def saved_for_backward(model: GPT, x: torch.Tensor, autocast: bool) -> int:
    """Bytes of the distinct storages autograd keeps from a forward with loss, weights (and their autocast
    copies) aside."""
    weight_shapes = {tuple(p.shape) for p in model.parameters()}
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape) not in weight_shapes:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        model(x, x)
    return sum(storages.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16"])
@pytest.mark.parametrize("options", [{}, {"mlp": "swiglu"}, {"pos_emb": "rope", "qk_norm": True},
                                     {"dropout": 0.1}, {"logit_softcap": 15.0}],
                         ids=["gpt2", "swiglu", "rope+qk_norm", "dropout", "softcap"])
def test_planned_activations_match_what_autograd_keeps(options, autocast):
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=4, n_embd=64, vocab_size=VOCAB, **options)).train()
    B, T = 4, 64
    x = torch.randint(0, VOCAB, (B, T))
    measured = saved_for_backward(model, x, autocast)
    dtype = torch.bfloat16 if autocast else torch.float32
    # the plan also counts the log-probabilities' gradient, which exists only once backward starts
    planned = (activation_bytes_per_token(model, T, dtype) - VOCAB * 4) * B * T
    assert planned == pytest.approx(measured, rel=0.25)


def test_the_plan_counts_state_once_and_by_optimizer():
    model = GPT(tiny_config(n_layer=2, n_embd=64))  # tied head: the embedding is counted once
    param_bytes = sum(p.numel() for p in model.parameters()) * 4
    adamw = plan_memory(model, build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu"), 8, 64,
                        torch.float32)
    assert adamw.parameters == adamw.gradients == param_bytes
    assert adamw.optimizer == 2 * param_bytes  # two moments
    muon = plan_memory(model, build_optimizer(model, "muon", 1e-3, 0.1, (0.9, 0.95), "cpu"), 8, 64,
                       torch.float32)
    matrices = sum(p.numel() for n, p in model.named_parameters() if n.startswith("transformer.h.")
                   and p.ndim >= 2) * 4
    assert muon.optimizer == 2 * param_bytes - matrices  # Muon's matrices keep one momentum buffer
    for p in model.transformer.h.parameters():
        p.requires_grad_(False)  # what a partly trained model (LoRA's base) looks like
    frozen = plan_memory(model, build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu"), 8, 64,
                         torch.float32)
    assert frozen.parameters == param_bytes and frozen.gradients < param_bytes / 2
    assert frozen.total == frozen.state + 8 * frozen.activations_per_row


def test_activation_checkpointing_plans_less_and_keeps_the_gradients(monkeypatch):
    torch.manual_seed(0)
    model = GPT(tiny_config(n_layer=2, dropout=0.1)).train()
    x = torch.randint(0, 97, (2, 64))

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        model.activation_checkpointing = checkpointing
        torch.manual_seed(1)  # the same dropout masks (checkpointing replays them in the recomputation)
        _, loss = model(x, x)
        loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    assert all(torch.equal(plain[name], checkpointed[name]) for name in plain)
    with torch.device("meta"):
        deep = GPT(tiny_config(n_layer=12))
    # 12 blocks keep their inputs only, and one block's activations come back at a time in backward
    assert (activation_bytes_per_token(deep, 64, torch.float32, activation_checkpointing=True)
            < activation_bytes_per_token(deep, 64, torch.float32) / 3)
    model.eval()  # inference never checkpoints
    calls = []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1))
    model(x)
    assert not calls


PLAN = MemoryPlan(parameters=GIB, gradients=GIB, optimizer=2 * GIB, activations_per_row=GIB, batch_size=32)


def test_an_oom_proposes_a_batch_that_fits_with_the_same_tokens_per_step():
    # 24 GiB: 90% of it less 4 GiB of state leaves 17 rows' worth; 32 rows x 16 micro-steps over 2 processes
    # are 256 rows per process, so 16 rows x 16 micro-steps per process (32 over both) keep the step's tokens
    message = oom_message(PLAN, 24 * GIB, 16, 2, asked="2.00 GiB")
    assert message == (
        "out of GPU memory (it asked for 2.00 GiB more): the plan needs ~36.00 GiB of 24.00 GiB at "
        "--batch_size=32; --batch_size=16 --gradient_accumulation_steps=32 would fit with the same tokens "
        "per step, or try --activation_checkpointing=True or a lower --block_size"
    )
    assert "--batch_size=8 --gradient_accumulation_steps=8 " in oom_message(PLAN, 16 * GIB, 2, 1)
    # the plan said 32 rows fit in 80 GiB, yet they did not: it proposes half, never more
    assert "--batch_size=16 --gradient_accumulation_steps=4 " in oom_message(PLAN, 80 * GIB, 2, 1)
    assert "even --batch_size=1 does not fit" in oom_message(PLAN, 4 * GIB, 2, 1)


def test_a_cuda_oom_in_training_is_one_line_naming_the_knobs(tmp_path, monkeypatch):
    char_dataset(tmp_path / "data")
    cfg = TrainConfig(dataset=DATASET, data_dir=str(tmp_path / "data"), out_dir=str(tmp_path / "run"),
                      n_layer=1, n_head=2, n_embd=32, block_size=32, batch_size=4,
                      gradient_accumulation_steps=2, eval_iters=1, max_iters=5, device="cpu", dtype="float32",
                      compile=False)
    trainer = Trainer(cfg, Dist(device="cpu"))
    trainer.device_type = "cuda"  # as if it ran on a GPU of 1 GiB
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=GIB))

    def out_of_memory() -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has ...")

    monkeypatch.setattr(trainer, "step", out_of_memory)
    with pytest.raises(GptforgeError, match=r"^out of GPU memory \(it asked for 20.00 MiB more\): the plan "
                                            r"needs ~0.00 GiB of 1.00 GiB at --batch_size=4; --batch_size=2 "
                                            r"--gradient_accumulation_steps=4 would fit"):
        trainer.run()
