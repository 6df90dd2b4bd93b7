"""Tests for gptforge.lora: an adapted GPT starts as its base, trains only its adapters, merges back into a
plain GPT computing the same function, and its adapters and base fingerprint round-trip.

    .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_lora.py
"""

import copy

import pytest
import torch
from conftest import tiny_config
from torch import nn

from gptforge import GPT
from gptforge.errors import GptforgeError
from gptforge.lora import (
    DEFAULT_TARGETS,
    TARGETS,
    LoRALinear,
    apply_lora,
    base_fingerprint,
    base_state_dict,
    load_lora_state_dict,
    lora_state_dict,
    merge_lora,
    trainable_report,
)

CONFIGS = {"gelu": {}, "swiglu": dict(mlp="swiglu"), "untied": dict(tie_embeddings=False)}


def base_model(seed: int = 0, **overrides) -> GPT:
    """A tiny GPT with every weight jittered: no zero-initialised head or projection hides a wrong merge."""
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def adapted(base: GPT, targets=TARGETS, rank: int = 4) -> GPT:
    model = copy.deepcopy(base)
    apply_lora(model, rank=rank, alpha=8.0, targets=targets)
    return model


def randomise_adapters(model: nn.Module, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in lora_state_dict(model).values():
            tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def logits(model: nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(idx, idx)[0]  # targets given: the logits of every position


IDX = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(0))


def test_a_fresh_adapter_is_exactly_the_base():
    base = base_model()
    model = adapted(base)
    assert torch.equal(logits(model, IDX), logits(base, IDX))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.scale == 8.0 / 4
    assert not layer.base.weight.requires_grad and layer.lora_A.requires_grad
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (96, 4)
    assert layer.lora_A.abs().sum() > 0 and not layer.lora_B.any()  # A random, B zero


@pytest.mark.parametrize("targets, count", [
    (DEFAULT_TARGETS, 2), (("c_proj",), 4), (TARGETS, 8), (("c_gate", "c_fc"), 2),  # no c_gate in a GELU MLP
])
def test_apply_lora_wraps_the_named_layers_and_freezes_the_rest(targets, count):
    model = base_model()
    assert apply_lora(model, rank=2, alpha=2.0, targets=targets) == count
    trainable = sorted(k for k, p in model.named_parameters() if p.requires_grad)
    assert trainable == sorted(lora_state_dict(model)) and len(trainable) == 2 * count


def test_swiglu_gate_is_a_target():
    model = base_model(mlp="swiglu")
    assert apply_lora(model, rank=2, alpha=2.0, targets=("c_gate",)) == 2
    assert isinstance(model.transformer.h[1].mlp.c_gate, LoRALinear)


def test_keeps_the_base_dtype():
    model = base_model().to(torch.bfloat16)
    apply_lora(model, rank=2, alpha=2.0)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.bfloat16
    assert model(IDX)[0].dtype == torch.bfloat16


def test_dropout_acts_on_the_lora_path_in_training_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=4.0, dropout=0.5)
    randomise_adapters(layer)
    x = torch.randn(64, 8)
    plain = layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T * layer.scale
    assert torch.equal(layer.eval()(x), plain)
    assert not torch.allclose(layer.train()(x), plain)


def test_training_changes_only_the_adapters():
    base = base_model()
    model = adapted(base)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = (torch.randint(0, 97, (4, 16), generator=generator) for _ in range(2))
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == set(lora_state_dict(model))  # every A and B moved, nothing else
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)
    for key, tensor in base_state_dict(model).items():
        assert torch.equal(tensor, base.state_dict()[key]), key  # bit-identical
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for k, p in model.named_parameters() if "lora_" in k}
    assert len(opt.state) == len(lora_state_dict(model))


@pytest.mark.parametrize("name", CONFIGS)
def test_merge_computes_the_same_function_as_a_plain_gpt(name):
    base = base_model(**CONFIGS[name])
    model = adapted(base)
    randomise_adapters(model)
    want = logits(model, IDX)
    assert not torch.allclose(want, logits(base, IDX), atol=1e-3)  # the adapters do change the model
    merged = merge_lora(copy.deepcopy(model))
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, IDX), want, rtol=0, atol=1e-5)
    assert list(merged.state_dict()) == list(base.state_dict())
    assert all(not p.requires_grad for p in merged.parameters())  # left frozen, as documented
    if name != "untied":
        assert merged.lm_head.weight is merged.transformer.wte.weight  # still tied


def test_merged_linear_keeps_its_bias():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=4.0)
    randomise_adapters(layer)
    x = torch.randn(3, 8)
    merged = layer.merged()
    assert type(merged) is nn.Linear and torch.equal(merged.bias, layer.base.bias)
    torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=1e-6)


def test_adapters_round_trip_into_a_fresh_copy():
    base = base_model()
    trained = adapted(base)
    randomise_adapters(trained)
    state = lora_state_dict(trained)
    assert set(state) == {f"transformer.h.{i}.{m}.{a}" for i in range(2)
                          for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
                          for a in ("lora_A", "lora_B")}
    fresh = adapted(base)
    load_lora_state_dict(fresh, {k: v.clone() for k, v in state.items()})
    assert torch.equal(logits(fresh, IDX), logits(trained, IDX))


def test_loading_adapters_is_strict():
    base = base_model()
    state = lora_state_dict(adapted(base))
    attn_only = adapted(base, targets=("c_attn",))
    with pytest.raises(GptforgeError, match=r"unexpected transformer\.h\.0\.attn\.c_proj\.lora_A.* more"):
        load_lora_state_dict(attn_only, state)
    with pytest.raises(GptforgeError, match=r"missing transformer\.h\.0\.attn\.c_attn\.lora_A"):
        load_lora_state_dict(attn_only, {})
    with pytest.raises(GptforgeError, match=r"shape \(4, 32\), the model's \(2, 32\); .* rank"):
        load_lora_state_dict(adapted(base, rank=2), state)
    with pytest.raises(GptforgeError, match="no LoRA adapters"):
        load_lora_state_dict(base_model(), state)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "rank must be a whole number >= 1, got 0"),
    (dict(rank=2.5), "rank must be"),
    (dict(targets=("c_attn", "q_proj")),
     "unknown LoRA target 'q_proj'; choose from c_attn, c_proj, c_fc, c_gate"),
    (dict(targets=("c_gate",)), "c_gate match no layer of this model; its layers are c_attn, c_proj, c_fc"),
    (dict(alpha=0.0), "alpha must be positive"),
    (dict(dropout=1.0), r"dropout must be in \[0, 1\)"),
])
def test_bad_settings_are_one_line_errors(kwargs, message):
    model = base_model()
    with pytest.raises(GptforgeError, match=message):
        apply_lora(model, **{"rank": 2, "alpha": 2.0, **kwargs})
    assert all(p.requires_grad for p in model.parameters())  # refused before anything changed


def test_adapting_twice_is_refused():
    model = adapted(base_model())
    with pytest.raises(GptforgeError, match="already has LoRA adapters"):
        apply_lora(model, rank=2, alpha=2.0)


def test_trainable_report():
    base = base_model()
    model = adapted(base, targets=("c_attn",), rank=4)
    report = trainable_report(model)
    adapters = sum(t.numel() for t in lora_state_dict(model).values())
    assert adapters == 2 * 4 * (32 + 96)
    assert report["trainable_params"] == adapters
    assert report["total_params"] == base.get_num_params(non_embedding=False) + adapters
    assert report["optimizer_state_bytes"] == 8 * adapters
    assert report["full_finetune_optimizer_state_bytes"] == 8 * base.get_num_params(non_embedding=False)
    assert trainable_report(base)["optimizer_state_bytes"] == report["full_finetune_optimizer_state_bytes"]


def test_base_state_dict_and_fingerprint():
    base = base_model()
    model = adapted(base)
    state = base_state_dict(model)
    assert list(state) == list(base.state_dict())
    assert base_state_dict(base).keys() == base.state_dict().keys()
    fingerprint = base_fingerprint(base.state_dict())
    assert len(fingerprint) == 64 and base_fingerprint(state) == fingerprint
    randomise_adapters(model)  # adapters change: the base is the same
    assert base_fingerprint(base_state_dict(model)) == fingerprint
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.base.weight[0, 0] += 1e-3  # one base weight changes: another base
    assert base_fingerprint(base_state_dict(model)) != fingerprint
    assert base_fingerprint(base.to(torch.bfloat16).state_dict()) != fingerprint  # dtype counts
    with pytest.raises(ValueError, match="base_state_dict"):
        base_fingerprint(model.state_dict())
