"""Tests for gptforge.optim: LR schedules, Newton–Schulz, Muon, and build_optimizer's param groups and state.

    .venv/bin/python -m pytest tests/test_optim.py
"""

import copy
import dataclasses
import io
import math
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import tiny_config
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from gptforge import GPT, GPTConfig
from gptforge.optim import Muon, build_optimizer, cosine_lr, wsd_lr, zeropower_via_newtonschulz5

FULL = StateDictOptions(full_state_dict=True)
MUON_ARGS = dict(learning_rate=3e-3, weight_decay=0.1, betas=(0.9, 0.95), device_type="cpu",
                 muon_lr=0.02, muon_momentum=0.95, embed_lr=1e-2, head_lr=2e-3, scalar_lr=4e-3,
                 muon_weight_decay=0.01)

# -- schedules --


def test_cosine_lr_values():
    args = dict(learning_rate=1.0, warmup_iters=4, lr_decay_iters=14, min_lr=0.1)
    assert [cosine_lr(it, **args) for it in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert cosine_lr(4, **args) == 1.0
    assert cosine_lr(9, **args) == pytest.approx(0.55, abs=1e-15)  # half way: (1 + 0.1) / 2
    assert cosine_lr(14, **args) == pytest.approx(0.1, abs=1e-15)
    assert cosine_lr(15, **args) == 0.1 and cosine_lr(1000, **args) == 0.1


def test_wsd_lr_values():
    args = dict(learning_rate=1.0, warmup_iters=4, max_iters=100, cooldown_frac=0.25, min_lr=0.1)
    # warm-up as cosine_lr's, then constant until the last 25 iterations
    assert [wsd_lr(it, **args) for it in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert [wsd_lr(it, **args) for it in (4, 50, 74, 75)] == [1.0, 1.0, 1.0, 1.0]
    # linear from 1.0 at iteration 75 to 0.1 at 100: 0.9 / 25 = 0.036 less per iteration
    assert wsd_lr(76, **args) == pytest.approx(0.964, abs=1e-15)
    assert wsd_lr(80, **args) == pytest.approx(0.82, abs=1e-15)
    assert wsd_lr(99, **args) == pytest.approx(0.136, abs=1e-15)
    assert wsd_lr(100, **args) == 0.1 and wsd_lr(500, **args) == 0.1


def test_wsd_lr_edge_cases():
    no_cooldown = dict(learning_rate=2.0, warmup_iters=0, max_iters=10, cooldown_frac=0.0, min_lr=0.5)
    assert [wsd_lr(it, **no_cooldown) for it in (0, 9, 10, 11)] == [2.0, 2.0, 0.5, 0.5]
    all_cooldown = dict(learning_rate=1.0, warmup_iters=0, max_iters=10, cooldown_frac=1.0, min_lr=0.0)
    assert [wsd_lr(it, **all_cooldown) for it in (0, 5, 10)] == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="cooldown_frac"):
        wsd_lr(0, 1.0, 0, 10, 1.5, 0.0)


# -- Newton–Schulz --


def matrix_with_spectrum(rows: int, cols: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A matrix with singular values log-spaced from 1 down to 1e-2, and its exact orthogonal factor U V^T.

    (Five quintic steps lift singular values down to about 1/500 of the Frobenius norm; a random square
    Gaussian matrix has smaller ones, which no 5-step iteration reaches.)
    """
    g = torch.Generator().manual_seed(seed)
    k = min(rows, cols)
    U, _ = torch.linalg.qr(torch.randn(rows, k, generator=g))
    V, _ = torch.linalg.qr(torch.randn(cols, k, generator=g))
    return (U * torch.logspace(0, -2, k)) @ V.T, U @ V.T


@pytest.mark.parametrize("shape", [(64, 64), (32, 96), (96, 32)], ids=["square", "wide", "tall"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_newton_schulz_is_close_to_orthogonal(shape, dtype):
    G, polar = matrix_with_spectrum(*shape)
    X = zeropower_via_newtonschulz5(G.to(dtype), steps=5, dtype=dtype)
    assert X.shape == G.shape and X.dtype == dtype
    singular_values = torch.linalg.svdvals(X.float())
    # the quintic's coefficients trade exact convergence for speed: singular values land in ~[0.68, 1.2]
    assert singular_values.min() > 0.65 and singular_values.max() < 1.25
    # and the singular vectors are G's: X is near G's own orthogonal factor, not any orthogonal matrix
    assert (X.float() - polar).norm() / polar.norm() < 0.25


def test_newton_schulz_batches_and_scale_invariance():
    G, _ = matrix_with_spectrum(16, 48)
    batch = torch.stack([G, 1000 * G, G.flip(0)])
    X = zeropower_via_newtonschulz5(batch, dtype=torch.float32)
    torch.testing.assert_close(X[0], zeropower_via_newtonschulz5(G, dtype=torch.float32))
    torch.testing.assert_close(X[1], X[0], rtol=1e-4, atol=1e-5)  # normalised first: the scale is irrelevant
    with pytest.raises(ValueError, match="needs a matrix"):
        zeropower_via_newtonschulz5(torch.ones(5))


# -- Muon --


def test_muon_step_decreases_loss_on_a_toy_problem():
    torch.manual_seed(0)
    target = 0.05 * torch.randn(24, 40)  # spectral norm ~0.5: reachable in ~10 steps of 0.05
    weight = nn.Parameter(torch.zeros(24, 40))
    x = torch.randn(256, 40)
    opt = Muon([weight], lr=0.05)

    def loss_fn() -> torch.Tensor:
        return (x @ (weight - target).T).pow(2).mean()

    losses = []
    for _ in range(30):
        loss = loss_fn()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[1] < losses[0]
    assert loss_fn().item() < 0.1 * losses[0]


def test_muon_update_is_scaled_orthogonal_momentum():
    """One step from zero momentum: Nesterov blends g with (1 - beta) g, NS normalises that away, and a tall
    matrix's update is scaled by sqrt(rows / cols)."""
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(96, 32))
    before = weight.detach().clone()
    weight.grad, _ = matrix_with_spectrum(96, 32)
    Muon([weight], lr=0.1, weight_decay=0.5, ns_dtype=torch.float32).step()
    expected = before * (1 - 0.1 * 0.5) - 0.1 * math.sqrt(3) * zeropower_via_newtonschulz5(
        weight.grad, dtype=torch.float32
    )
    torch.testing.assert_close(weight.detach(), expected)


def test_muon_adamw_groups_match_torch_adamw():
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(10, 6))
    b = nn.Parameter(a.detach().clone())
    ours = Muon([dict(params=[a], kind="adamw", lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)])
    reference = torch.optim.AdamW([b], lr=1e-2, betas=(0.8, 0.95), eps=1e-8, weight_decay=0.1)
    for _ in range(5):
        grad = torch.randn(10, 6)
        a.grad, b.grad = grad.clone(), grad.clone()
        ours.step()
        reference.step()
    torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def test_muon_rejects_vectors_and_unknown_kinds():
    with pytest.raises(ValueError, match="'adamw' group"):
        Muon([nn.Parameter(torch.ones(4))])
    with pytest.raises(ValueError, match="kind must be"):
        Muon([dict(params=[nn.Parameter(torch.ones(4, 4))], kind="sgd")])


# -- build_optimizer --


def untied(model: GPT) -> GPT:
    model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
    return model


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_every_parameter_lands_in_exactly_one_group(tie, bias):
    torch.manual_seed(0)
    model = GPT(tiny_config(bias=bias))
    if not tie:
        model = untied(model)
    opt = build_optimizer(model, "muon", **MUON_ARGS)
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # each once, none missing

    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert by_group["matrices"] == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim == 2
    )
    assert by_group["scalars"] == sorted(n for n, p in model.named_parameters() if p.ndim == 1)
    if tie:  # the shared matrix is the head
        assert (
            by_group["head"] == ["transformer.wte.weight"] and by_group["embed"] == ["transformer.wpe.weight"]
        )
    else:
        assert by_group["head"] == ["lm_head.weight"]
        assert by_group["embed"] == ["transformer.wpe.weight", "transformer.wte.weight"]

    settings = {g["name"]: (g["kind"], g["lr"], g["base_lr"], g["weight_decay"]) for g in opt.param_groups}
    assert settings == {
        "matrices": ("muon", 0.02, 0.02, 0.01),
        "embed": ("adamw", 1e-2, 1e-2, 0.1),
        "head": ("adamw", 2e-3, 2e-3, 0.1),
        "scalars": ("adamw", 4e-3, 4e-3, 0.0),
    }
    assert all(g["betas"] == (0.9, 0.95) for g in opt.param_groups if g["kind"] == "adamw")
    assert next(g for g in opt.param_groups if g["kind"] == "muon")["momentum"] == 0.95


def test_modern_model_options_are_grouped_by_name():
    options = dict(pos_emb="rope", mlp="swiglu", norm="rmsnorm", tie_embeddings=False, bias=False)
    if not set(options) <= {f.name for f in dataclasses.fields(GPTConfig)}:
        pytest.skip("GPTConfig has no architecture options yet")
    model = GPT(tiny_config(**options))
    opt = build_optimizer(model, "muon", **MUON_ARGS)
    names = {id(p): n for n, p in model.named_parameters()}
    by_group = {g["name"]: sorted(names[id(p)] for p in g["params"]) for g in opt.param_groups}
    assert sum(map(len, by_group.values())) == len(names)
    assert by_group["matrices"] == sorted(
        n for n, p in model.named_parameters() if n.startswith("transformer.h.") and p.ndim >= 2
    )
    assert by_group["embed"] == ["transformer.wte.weight"] and by_group["head"] == ["lm_head.weight"]


def test_lrs_default_to_learning_rate():
    model = GPT(tiny_config())
    opt = build_optimizer(model, "muon", learning_rate=1e-3, weight_decay=0.0, betas=(0.9, 0.99),
                          device_type="cpu")
    assert {g["name"]: g["base_lr"] for g in opt.param_groups} == {
        "matrices": 0.02, "embed": 1e-3, "head": 1e-3, "scalars": 1e-3
    }


def test_adamw_kind_is_configure_optimizers():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    opt = build_optimizer(model, "adamw", learning_rate=6e-4, weight_decay=0.1, betas=(0.9, 0.95),
                          device_type="cpu", muon_lr=0.05)
    reference = model.configure_optimizers(0.1, 6e-4, (0.9, 0.95), "cpu")
    assert type(opt) is type(reference)
    assert opt.defaults == reference.defaults
    for group, ref in zip(opt.param_groups, reference.param_groups, strict=True):
        assert [id(p) for p in group["params"]] == [id(p) for p in ref["params"]]
        assert {k: v for k, v in group.items() if k not in ("params", "base_lr", "kind")} == \
            {k: v for k, v in ref.items() if k != "params"}
        assert group["base_lr"] == group["lr"] == 6e-4 and group["kind"] == "adamw"


def test_unknown_kind_is_an_error():
    with pytest.raises(ValueError, match="'adamw' or 'muon'"):
        build_optimizer(GPT(tiny_config()), "sgd", **{k: MUON_ARGS[k] for k in
                        ("learning_rate", "weight_decay", "betas", "device_type")})


# -- state: resume is bit-identical --


def train_steps(model: GPT, opt: torch.optim.Optimizer, steps: range) -> None:
    """Train on batches that depend only on the step number, at a schedule scaled per group by base_lr."""
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x = torch.randint(0, 97, (4, 16), generator=g)
        y = torch.randint(0, 97, (4, 16), generator=g)
        for group in opt.param_groups:
            group["lr"] = group["base_lr"] * wsd_lr(step, 1.0, 2, 8, 0.5, 0.1)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def fresh_pair(kind: str) -> tuple[GPT, torch.optim.Optimizer]:
    torch.manual_seed(1234)
    model = untied(GPT(tiny_config()))
    return model, build_optimizer(model, kind, **MUON_ARGS)


def through_file(obj: dict) -> dict:
    """A save and a load as checkpoints do them: torch.save, then torch.load(weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("kind", ["muon", "adamw"])
@pytest.mark.parametrize("api", ["state_dict", "distributed_checkpoint"])
def test_resumed_optimizer_continues_bit_identically(kind, api):
    whole, whole_opt = fresh_pair(kind)
    train_steps(whole, whole_opt, range(4))
    if api == "state_dict":
        saved = through_file({"model": whole.state_dict(), "optimizer": whole_opt.state_dict()})
    else:  # as the trainer saves and restores: full (unsharded) state dicts keyed by parameter names
        model_state, optim_state = get_state_dict(whole, whole_opt, options=FULL)
        saved = through_file({"model": model_state, "optimizer": optim_state})

    resumed, resumed_opt = fresh_pair(kind)
    if api == "state_dict":
        resumed.load_state_dict(saved["model"])
        resumed_opt.load_state_dict(saved["optimizer"])
    else:
        set_state_dict(resumed, resumed_opt, model_state_dict=saved["model"],
                       optim_state_dict=saved["optimizer"], options=FULL)
    assert len(resumed_opt.state) == len(whole_opt.state) > 0
    for p, q in zip(whole.parameters(), resumed.parameters(), strict=True):
        for key, value in whole_opt.state[p].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed_opt.state[q][key])), key

    train_steps(whole, whole_opt, range(4, 8))
    train_steps(resumed, resumed_opt, range(4, 8))
    for (name, p), q in zip(whole.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


# -- FSDP2: sharded Muon equals unsharded Muon --


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fsdp_worker(rank: int, world_size: int, port: int) -> None:
    from torch.distributed.fsdp import fully_shard

    def shard(model: GPT) -> GPT:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        return model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)
        reference = GPT(tiny_config())
        initial = copy.deepcopy(reference)
        sharded = shard(copy.deepcopy(reference))
        ref_opt = build_optimizer(reference, "muon", **MUON_ARGS)
        opt = build_optimizer(sharded, "muon", **MUON_ARGS)
        # every rank sees the same batch, so the averaged sharded gradient is the single-process one
        train_steps(reference, ref_opt, range(3))
        train_steps(sharded, opt, range(3))
        for (name, p), q in zip(sharded.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=0, atol=1e-6, msg=name)
        # the momentum buffers are sharded like their parameters and gather into the unsharded ones
        model_state, optim_state = get_state_dict(sharded, opt, options=FULL)
        ref_state = get_state_dict(reference, ref_opt, options=FULL)[1]["state"]
        assert optim_state["state"].keys() == ref_state.keys()
        for key, values in optim_state["state"].items():
            for name, value in values.items():
                torch.testing.assert_close(torch.as_tensor(value), torch.as_tensor(ref_state[key][name]),
                                           rtol=0, atol=1e-6, msg=f"{key} {name}")
        # and a sharded resume from the full state dicts continues exactly
        resumed = shard(initial)
        resumed_opt = build_optimizer(resumed, "muon", **MUON_ARGS)
        set_state_dict(resumed, resumed_opt, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=FULL)
        train_steps(sharded, opt, range(3, 5))
        train_steps(resumed, resumed_opt, range(3, 5))
        for (name, p), q in zip(sharded.named_parameters(), resumed.parameters(), strict=True):
            assert torch.equal(p.full_tensor(), q.full_tensor()), name
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_sharded_muon_matches_one_process():
    mp.spawn(fsdp_worker, args=(2, free_port()), nprocs=2, join=True)
