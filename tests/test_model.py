"""Tests for gptforge.model: config validation, forward, init, parameters, optimizer, MFU.

    .venv/bin/python -m pytest tests/test_model.py
"""

import math

import pytest
import torch
from conftest import tiny_config
from torch.nn import functional as F

from gptforge import GPT, GPTConfig


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(n_embd=30, n_head=4), "divisible by n_head"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer"),
        (dict(block_size=1.5), "block_size must be a positive integer"),
        (dict(dropout=1.0), "dropout must be in"),
        (dict(gelu_approximate="erf"), "gelu_approximate"),
    ],
)
def test_config_rejects_bad_values(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_default_config_is_gpt2_124m():
    cfg = GPTConfig()
    assert (cfg.block_size, cfg.vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == (1024, 50304, 12, 12, 768)
    assert cfg.bias and cfg.dropout == 0.0 and cfg.gelu_approximate == "tanh"


def test_structure_and_weight_tying(tiny_model):
    names = {name for name, _ in tiny_model.named_modules()}
    for name in ("transformer.wte", "transformer.wpe", "transformer.drop", "transformer.ln_f", "lm_head",
                 "transformer.h.0.ln_1", "transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                 "transformer.h.0.ln_2", "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"):
        assert name in names
    assert tiny_model.lm_head.weight is tiny_model.transformer.wte.weight
    assert tiny_model.transformer.h[0].mlp.gelu.approximate == "tanh"


def test_forward_shapes_and_loss(tiny_model):
    idx = torch.randint(0, 97, (3, 20))
    targets = torch.randint(0, 97, (3, 20))
    logits, loss = tiny_model(idx, targets)
    assert logits.shape == (3, 20, 97)
    assert loss.shape == ()
    assert loss.item() == pytest.approx(
        F.cross_entropy(logits.view(-1, 97), targets.view(-1)).item(), rel=1e-6
    )
    # a random init predicts close to uniform: loss near ln(vocab)
    assert abs(loss.item() - math.log(97)) < 0.1

    last, no_loss = tiny_model(idx)
    assert no_loss is None and last.shape == (3, 1, 97)
    torch.testing.assert_close(last[:, 0], logits[:, -1], rtol=0, atol=1e-6)


def test_targets_of_minus_one_are_ignored(tiny_model):
    idx = torch.randint(0, 97, (2, 16))
    targets = torch.randint(0, 97, (2, 16))
    masked = targets.clone()
    masked[:, :8] = -1
    logits, loss = tiny_model(idx, masked)
    expected = F.cross_entropy(logits[:, 8:].reshape(-1, 97), targets[:, 8:].reshape(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


def test_sequence_longer_than_block_size_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="block_size is 64"):
        tiny_model(torch.zeros(1, 65, dtype=torch.long))


def test_gpt2_init_statistics():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=256, vocab_size=2000, block_size=256))
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.transformer.h]
                     + [b.mlp.c_proj.weight.flatten() for b in model.transformer.h])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * 4), rel=0.02)
    for w in (model.transformer.wte.weight, model.transformer.wpe.weight,
              model.transformer.h[0].mlp.c_fc.weight):
        assert w.std().item() == pytest.approx(0.02, rel=0.02)
    assert all(torch.count_nonzero(b.attn.c_attn.bias) == 0 for b in model.transformer.h)
    assert torch.equal(model.transformer.ln_f.weight, torch.ones(256))


def test_get_num_params_counts_gpt2_124m():
    model = GPT(GPTConfig(vocab_size=50257))
    # GPT-2 124M: 124,439,808 parameters in all (tied head counted once), 786,432 of them position embeddings
    assert model.get_num_params(non_embedding=False) == 124_439_808
    assert model.get_num_params() == 124_439_808 - 1024 * 768


def test_crop_block_size(tiny_model):
    idx = torch.randint(0, 97, (1, 16))
    before, _ = tiny_model(idx)
    tiny_model.crop_block_size(16)
    assert tiny_model.config.block_size == 16
    assert tiny_model.transformer.wpe.weight.shape == (16, 32)
    after, _ = tiny_model(idx)
    torch.testing.assert_close(before, after)
    with pytest.raises(ValueError, match="block_size is 16"):
        tiny_model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match=r"1\.\.16"):
        tiny_model.crop_block_size(32)


def test_bias_false_has_no_biases():
    model = GPT(tiny_config(bias=False))
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    _, loss = model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long))
    assert torch.isfinite(loss)


def test_exact_gelu_option():
    torch.manual_seed(0)
    tanh_model = GPT(tiny_config())
    erf_model = GPT(tiny_config(gelu_approximate="none"))
    erf_model.load_state_dict(tanh_model.state_dict())
    idx = torch.randint(0, 97, (1, 8))
    assert not torch.equal(tanh_model(idx)[0], erf_model(idx)[0])
    assert erf_model.transformer.h[0].mlp.gelu.approximate == "none"


def test_configure_optimizers_decays_only_matrices(tiny_model):
    opt = tiny_model.configure_optimizers(
        weight_decay=0.1, learning_rate=1e-3, betas=(0.9, 0.95), device_type="cpu"
    )
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    n_params = len(list(tiny_model.parameters()))  # the tied matrix is one parameter
    assert len(decay["params"]) + len(no_decay["params"]) == n_params
    assert opt.defaults["fused"] is True and opt.defaults["betas"] == (0.9, 0.95)


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    opt = model.configure_optimizers(
        weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.95), device_type="cpu"
    )
    idx = torch.randint(0, 97, (4, 32))
    targets = torch.roll(idx, -1, dims=1)
    losses = []
    for _ in range(30):
        _, loss = model(idx, targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.parameters())
    assert losses[-1] < 0.5 * losses[0], losses


def test_estimate_mfu_with_a_given_peak(tiny_model):
    cfg = tiny_model.config
    n = tiny_model.get_num_params()
    flops_per_iter = (
        6 * n + 12 * cfg.n_layer * cfg.n_head * (cfg.n_embd // cfg.n_head) * cfg.block_size
    ) * cfg.block_size * 8
    mfu = tiny_model.estimate_mfu(fwdbwd_per_iter=8, dt=0.5, peak_flops=1e12)
    assert mfu == pytest.approx(flops_per_iter / 0.5 / 1e12)


def test_estimate_mfu_on_cpu_uses_a_measured_peak(tiny_model):
    mfu = tiny_model.estimate_mfu(fwdbwd_per_iter=1, dt=1.0)
    assert mfu is not None and 0 < mfu < 1


@pytest.mark.slow
def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = GPT(tiny_config())
    compiled = torch.compile(model)
    idx = torch.randint(0, 97, (2, 64))
    logits, loss = compiled(idx, idx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_logits, ref_loss = model(idx, idx)
    ref_loss.backward()
    torch.testing.assert_close(logits, ref_logits, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6)
    # methods reach the plain module, so generation on a compiled model runs eagerly and equals it
    compiled.eval()
    assert torch.equal(
        compiled.generate(idx[:, :4], 8, temperature=0), model.generate(idx[:, :4], 8, temperature=0)
    )
