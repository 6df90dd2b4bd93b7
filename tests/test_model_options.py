"""Tests for gptforge.model's options beyond GPT-2: each changes what it says, and nothing else breaks.

    .venv/bin/python -m pytest tests/test_model_options.py

The KV cache is tested against full recomputation for these options in tests/test_generate.py.
"""

import math
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn
from conftest import tiny_config
from torch.nn import functional as F

from gptforge import GPT, GPTConfig
from gptforge.checkpoint import load_checkpoint, save_model
from gptforge.errors import GptforgeError
from gptforge.model import Rotary, apply_rotary, swiglu_hidden_size

# The speedrun's architecture, every option on; and a Llama-like one with the gated MLP.
MODERN = dict(pos_emb="rope", norm="rmsnorm", mlp="relu2", qk_norm=True, tie_embeddings=False,
              logit_softcap=15.0, zero_init_proj=True)
LLAMA = dict(pos_emb="rope", norm="rmsnorm", mlp="swiglu", bias=False, tie_embeddings=False)
OPTION_SETS = {"gpt2": {}, "modern": MODERN, "llama": LLAMA}
NEW_FIELDS = ("pos_emb", "norm", "mlp", "qk_norm", "tie_embeddings", "logit_softcap", "zero_init_proj")


def jittered(model: GPT, std: float = 0.1) -> GPT:
    """The model with noise on every weight: zero-initialised heads and projections make a constant model,
    which would pass any comparison of generated tokens."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(std * torch.randn_like(p))
    return model


def make_model(options: dict, seed: int = 0, **shape) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**options, **shape))
    return (jittered(model) if options else model).eval()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(pos_emb="alibi"), "pos_emb must be one of 'learned', 'rope'"),
        (dict(norm="batchnorm"), "norm must be one of"),
        (dict(mlp="geglu"), "mlp must be one of 'gelu', 'relu2', 'swiglu'"),
        (dict(qk_norm=1), "qk_norm must be True or False"),
        (dict(tie_embeddings="no"), "tie_embeddings must be True or False"),
        (dict(zero_init_proj=None), "zero_init_proj must be True or False"),
        (dict(logit_softcap=0.0), "logit_softcap must be a positive number or None"),
        (dict(logit_softcap=-30), "logit_softcap"),
        (dict(logit_softcap=float("inf")), "logit_softcap"),
        (dict(logit_softcap="30"), "logit_softcap"),
        (dict(logit_softcap=True), "logit_softcap"),
        (dict(pos_emb="rope", n_embd=36, n_head=4), r"head size n_embd // n_head \(9\) must be even"),
    ],
)
def test_bad_option_values_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        tiny_config(**overrides)


def test_defaults_are_gpt2_and_old_configs_get_them():
    cfg = GPTConfig()
    assert (cfg.pos_emb, cfg.norm, cfg.mlp, cfg.qk_norm, cfg.tie_embeddings, cfg.logit_softcap,
            cfg.zero_init_proj) == ("learned", "layernorm", "gelu", False, True, None, False)
    old = {k: v for k, v in asdict(tiny_config(**MODERN)).items() if k not in NEW_FIELDS}
    assert GPTConfig.from_dict({**old, "some_future_field": 1}) == tiny_config()


def test_rope_has_no_position_embedding_and_checkpoints_no_tables():
    model = GPT(tiny_config(pos_emb="rope"))
    assert "wpe" not in model.transformer
    assert not [n for n, _ in model.named_parameters() if "wpe" in n]
    assert set(model.state_dict()) == {n for n, _ in model.named_parameters()} | {"lm_head.weight"}
    assert model.rotary.cos.shape == model.rotary.sin.shape == (64, 4)  # (block_size, head_size / 2)
    assert model.get_num_params() == model.get_num_params(non_embedding=False)


def test_rotary_scores_depend_only_on_the_distance():
    rotary = Rotary(head_size=16, max_len=200)
    q, k = torch.randn(16), torch.randn(16)

    def score(m: int, n: int) -> float:  # q at position m against k at position n
        return float(apply_rotary(q.view(1, 16), rotary(m, 1)) @ apply_rotary(k.view(1, 16), rotary(n, 1)).T)

    assert score(10, 3) == pytest.approx(score(150, 143), abs=1e-5)
    assert score(10, 3) != pytest.approx(score(10, 4), abs=1e-3)
    # a rotation keeps the norm; position 0 is no rotation at all
    assert float(apply_rotary(q.view(1, 16), rotary(99, 1)).norm()) == pytest.approx(
        float(q.norm()), rel=1e-6
    )
    assert torch.equal(apply_rotary(q.view(1, 16), rotary(0, 1)), q.view(1, 16))


def test_rope_model_is_shift_equivariant():
    """With rotary positions only distances matter: starting the positions at 40 changes no logit."""
    model = make_model(dict(pos_emb="rope"), block_size=128)
    idx = torch.randint(0, 97, (2, 48))
    with torch.no_grad():
        at_zero, _ = model(idx, idx)
        model.rotary.forward = lambda start, length: Rotary.forward(model.rotary, start + 40, length)
        at_forty, _ = model(idx, idx)
        # position 0 everywhere
        model.rotary.forward = lambda start, length: Rotary.forward(model.rotary, 0, 1)
        unrotated, _ = model(idx, idx)
    torch.testing.assert_close(at_forty, at_zero, rtol=0, atol=1e-5)
    assert (unrotated - at_zero).abs().max() > 1e-3  # positions do reach the logits


def test_crop_block_size_with_rope():
    model = make_model(dict(pos_emb="rope"))
    idx = torch.randint(0, 97, (1, 16))
    before, _ = model(idx)
    model.crop_block_size(16)
    assert model.rotary.cos.shape == (16, 4) and model.rotary.sin.shape == (16, 4)
    torch.testing.assert_close(model(idx)[0], before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="block_size is 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_rmsnorm_has_a_scale_and_no_bias():
    model = GPT(tiny_config(norm="rmsnorm"))
    norms = [model.transformer.ln_f] + [m for b in model.transformer.h for m in (b.ln_1, b.ln_2)]
    assert all(isinstance(m, nn.RMSNorm) for m in norms)
    assert not [n for n, _ in model.named_parameters() if ".ln_" in n and n.endswith("bias")]
    x = 3 + 5 * torch.randn(4, 32)
    torch.testing.assert_close(
        model.transformer.ln_f(x), x / x.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt()
    )


def test_relu2_mlp():
    model = GPT(tiny_config(mlp="relu2"))
    mlp = model.transformer.h[0].mlp
    assert mlp.gelu is None and mlp.c_fc.out_features == 4 * 32
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.relu(mlp.c_fc(x)) ** 2))


def test_swiglu_mlp_and_its_parameter_count():
    model = GPT(tiny_config(mlp="swiglu"))
    mlp = model.transformer.h[0].mlp
    assert {n for n, _ in mlp.named_children()} == {"c_fc", "c_gate", "c_proj", "dropout"}
    assert mlp.c_fc.out_features == mlp.c_gate.out_features == 128  # 8/3 * 32 = 85.3, up to a multiple of 64
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(mlp(x), mlp.c_proj(F.silu(mlp.c_gate(x)) * mlp.c_fc(x)))
    # GPT-2 124M's width: three 768 x 2048 matrices hold exactly the weights of two 768 x 3072 ones
    assert swiglu_hidden_size(768) == 2048
    gelu = GPT(GPTConfig(n_layer=1, bias=False, vocab_size=64))
    swiglu = GPT(GPTConfig(n_layer=1, bias=False, vocab_size=64, mlp="swiglu"))
    assert swiglu.get_num_params() == gelu.get_num_params()


def test_qk_norm_makes_attention_blind_to_the_scale_of_queries_and_keys():
    x = torch.randn(2, 10, 32)
    for qk_norm in (True, False):
        model = make_model(dict(qk_norm=qk_norm))
        attn = model.transformer.h[0].attn
        with torch.no_grad():
            before = attn(x)
            attn.c_attn.weight[: 2 * 32] *= 10  # the query and key rows
            attn.c_attn.bias[: 2 * 32] *= 10
            after = attn(x)
        change = (after - before).abs().max().item()
        assert change < 1e-4 if qk_norm else change > 1e-3  # with QK-norm only the norm's epsilon tells


def test_untied_head_starts_at_zero_and_is_its_own_matrix():
    model = GPT(tiny_config(tie_embeddings=False))
    assert model.lm_head.weight is not model.transformer.wte.weight
    assert model.lm_head.weight.abs().sum() == 0
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.1)
    idx = torch.randint(0, 97, (2, 16))
    _, loss = model(idx, idx)
    assert loss.item() == pytest.approx(math.log(97), abs=1e-6)  # uniform predictions
    # each matrix once, in the optimizer and in the counts; the untied embedding is a lookup, not a matmul
    opt = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), "cpu")
    n_tensors = sum(len(g["params"]) for g in opt.param_groups)
    assert n_tensors == len(list(model.parameters())) == len(list(GPT(tiny_config()).parameters())) + 1
    total = sum(p.numel() for p in model.parameters())
    assert model.get_num_params(non_embedding=False) == total
    assert model.get_num_params() == total - 97 * 32 - 64 * 32  # no token nor position table


def test_logit_softcap_bounds_the_logits_in_training_and_generation():
    capped = make_model(dict(logit_softcap=2.0))
    with torch.no_grad():
        capped.lm_head.weight *= 200  # large enough that raw logits exceed the cap
    plain = GPT(tiny_config()).eval()
    plain.load_state_dict(capped.state_dict())
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        raw, _ = plain(idx, idx)
        logits, loss = capped(idx, idx)
        last, _ = capped(idx)
    assert raw.abs().max() > 4
    assert logits.abs().max() <= 2.0 and last.abs().max() <= 2.0
    torch.testing.assert_close(logits, 2.0 * torch.tanh(raw / 2.0))
    torch.testing.assert_close(loss, F.cross_entropy(logits.view(-1, 97), idx.view(-1)))
    # the head on one row rounds unlike the head on all 16 (another kernel), and the 200x weights magnify it
    torch.testing.assert_close(last[:, 0], logits[:, -1], rtol=0, atol=1e-4)


@pytest.mark.parametrize("pos_emb", ["learned", "rope"])
def test_zero_init_proj_makes_the_residual_stream_the_embedding(pos_emb):
    torch.manual_seed(0)
    model = GPT(tiny_config(zero_init_proj=True, pos_emb=pos_emb)).eval()
    assert all(b.attn.c_proj.weight.abs().sum() == 0 and b.mlp.c_proj.weight.abs().sum() == 0
               for b in model.transformer.h)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)
    streams = []
    model.transformer.ln_f.register_forward_hook(lambda module, args, out: streams.append(args[0]))
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        model(idx, idx)
    embedding = model.transformer.wte(idx)
    if pos_emb == "learned":
        embedding = embedding + model.transformer.wpe(torch.arange(16))
    assert torch.equal(streams[0], embedding)


def test_modern_model_trains_every_parameter():
    torch.manual_seed(0)
    model = GPT(tiny_config(**MODERN))
    opt = model.configure_optimizers(
        weight_decay=0.0, learning_rate=3e-3, betas=(0.9, 0.95), device_type="cpu"
    )
    idx = torch.randint(0, 97, (4, 32))
    targets = torch.roll(idx, -1, dims=1)
    losses = []
    for step in range(30):
        opt.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        losses.append(loss.item())
        learning = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if step == 0:  # the zero head passes no gradient back: it learns alone first, then the rest follows
            assert learning == {"lm_head.weight"}
        opt.step()
    assert learning == {n for n, _ in model.named_parameters()}
    assert losses[0] == pytest.approx(math.log(97), abs=1e-6) and losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", ["modern", "llama"])
def test_bf16_autocast_and_bf16_weights(name):
    model = make_model(OPTION_SETS[name])
    idx = torch.randint(0, 97, (2, 32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    assert torch.isfinite(loss)
    out = model.to(torch.bfloat16).generate(idx[:, :4], 8, temperature=0)
    assert out.shape == (2, 12)


def test_estimate_mfu_counts_the_modern_model(tmp_path):
    model = GPT(tiny_config(**MODERN))
    n = model.get_num_params()
    assert n == sum(p.numel() for p in model.parameters()) - 97 * 32  # no wpe; the untied wte is a lookup
    flops_per_iter = (6 * n + 12 * 2 * 4 * 8 * 64) * 64 * 8
    assert model.estimate_mfu(fwdbwd_per_iter=8, dt=0.5, peak_flops=1e12) == pytest.approx(
        flops_per_iter / 0.5 / 1e12
    )


@pytest.mark.parametrize("name", ["modern", "llama"])
def test_checkpoint_round_trip(name, tmp_path):
    model = make_model(OPTION_SETS[name])
    save_model(model, tmp_path / "ckpt.pt")
    loaded = GPT.from_checkpoint(tmp_path / "ckpt.pt").eval()
    assert loaded.config == model.config
    assert not [k for k in load_checkpoint(tmp_path / "ckpt.pt")["model"] if "rotary" in k]
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(idx, idx)[0], model(idx, idx)[0])
    assert torch.equal(
        loaded.generate(idx[:, :3], 10, temperature=0), model.generate(idx[:, :3], 10, temperature=0)
    )


def test_checkpoint_without_the_option_fields_loads_as_gpt2(tmp_path):
    model = make_model({})
    save_model(model, tmp_path / "ckpt.pt")
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    ckpt["model_args"] = {k: v for k, v in ckpt["model_args"].items() if k not in NEW_FIELDS}
    torch.save(ckpt, tmp_path / "old.pt")
    loaded = GPT.from_checkpoint(tmp_path / "old.pt")
    assert loaded.config == model.config
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(idx, idx)[0], model(idx, idx)[0])


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (MODERN, ["pos_emb='rope'", "norm='rmsnorm'", "mlp='relu2'", "qk_norm=True", "tie_embeddings=False",
                  "logit_softcap=15.0"]),
        (dict(mlp="swiglu"), ["mlp='swiglu'"]),
    ],
)
def test_to_hf_refuses_what_gpt2_cannot_express(options, named, tmp_path):
    with pytest.raises(GptforgeError, match="not GPT-2") as error:
        GPT(tiny_config(**options)).to_hf(tmp_path / "export")
    assert all(option in str(error.value) for option in named)
    assert "zero_init_proj" not in str(error.value)
    assert not (tmp_path / "export").exists()


def test_to_hf_exports_a_zero_init_proj_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = make_model(dict(zero_init_proj=True))  # an initialisation, not another network
    model.to_hf(tmp_path / "export")
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "export").eval()
    idx = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits[:, -1:], model(idx)[0], rtol=0, atol=1e-5)


@pytest.mark.slow
def test_compiled_modern_model_matches_eager():
    model = make_model(MODERN).train()
    idx = torch.randint(0, 97, (2, 64))

    def logits_and_grads(module: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits, loss = module(idx, idx)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad()
        return logits, grads

    eager_logits, eager_grads = logits_and_grads(model)
    compiled_logits, compiled_grads = logits_and_grads(torch.compile(model))
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=0, atol=1e-5)
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6)
