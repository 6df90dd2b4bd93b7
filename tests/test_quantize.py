"""Tests for gptforge.quantize: int8 weight-only matmuls against fp32 within their error bound, the quantized
model's KV cache against its own recomputation, `--quantize=int8` in sample, eval and a served request against
float32 on a small trained run, and one-line errors for what cannot work.

    .venv/bin/python -m pytest tests/test_quantize.py
"""

import io
import re

import httpx
import pytest
import torch
import torch.nn as nn
from conftest import tiny_config
from tiny_run import jittered, tiny_run

from gptforge import GPT
from gptforge.cli import main
from gptforge.errors import GptforgeError
from gptforge.evaluate import EvalOptions, evaluate
from gptforge.generate import decoding_model
from gptforge.kv_cache import KVCache
from gptforge.options import apply_overrides
from gptforge.quantize import Int8Embedding, Int8Linear, check_quantize, quantize, quantize_rows
from gptforge.source import load_source

BF16_EPS = 2.0**-8  # bfloat16's relative rounding error, at most (8 bits of mantissa)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return tiny_run(tmp_path_factory.mktemp("quantize"))


def test_rows_round_to_within_half_a_step_of_their_own_scale():
    w = torch.randn(64, 48) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different sizes
    w[5] = 0.0
    q, scales = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scales.shape == (64,)
    step = scales.float()[:, None]
    assert ((q.float() * step - w).abs() <= step * (0.5 + BF16_EPS * 127)).all()  # scales are bf16-rounded
    assert torch.equal(q[5], torch.zeros(48, dtype=torch.int8)) and scales[5] == 1


def test_int8_matmul_is_within_its_error_bound():
    torch.manual_seed(0)
    linear = nn.Linear(768, 300)
    x = torch.randn(3, 5, 768)
    quantized = Int8Linear.from_linear(linear)
    got, want = quantized(x), linear(x).detach()
    assert got.shape == want.shape and got.dtype == torch.float32
    # each weight is off by at most half its row's step; the input and output are rounded to bfloat16
    w_q = quantized.weight.double() * quantized.scales.double()[:, None]
    bound = (x.abs().double() @ (quantized.scales.double()[:, None] / 2 + w_q.abs() * BF16_EPS).T
             + want.abs().double() * BF16_EPS + 1e-6)
    error = (got - want).abs().double()
    assert (error <= bound).all()
    # and the bound is not loose: int8 is ~100x closer to fp32 than the outputs' own size
    assert error.mean() < want.abs().mean() / 100


def test_a_quantized_model_keeps_its_tie_and_leaves_what_the_kernel_cannot_take():
    model = quantize(jittered(tiny_config()))
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.transformer.h[0].mlp.c_fc, Int8Linear)
    assert isinstance(model.transformer.wte, Int8Embedding) and model.transformer.wte.head is model.lm_head
    untied = quantize(jittered(tiny_config(tie_embeddings=False)))
    assert isinstance(untied.lm_head, Int8Linear) and isinstance(untied.transformer.wte, nn.Embedding)
    odd = quantize(jittered(tiny_config(n_embd=24, n_head=4)))  # 24 inputs: not a multiple of 16
    assert isinstance(odd.transformer.h[0].attn.c_attn, nn.Linear)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_quantized_kv_cache_matches_its_own_recomputation(dtype):
    model = decoding_model(jittered(tiny_config(block_size=128)), "cpu", dtype, "int8")
    idx = torch.randint(0, 97, (2, 40))
    with torch.inference_mode():
        full = model(idx)[0][:, -1].float()
        cache = KVCache(model.config, 2)
        model(idx[:, :-1], kv_cache=cache)
        step = model(idx[:, -1:], kv_cache=cache)[0][:, -1].float()
    torch.testing.assert_close(step, full, rtol=0, atol=0.05 if dtype == "bfloat16" else 1e-3)
    assert model.generate(idx[:, :4], 20, temperature=0).shape == (2, 24)


def agreement(a: str, b: str) -> float:
    return sum(x == y for x, y in zip(a, b, strict=True)) / len(a)


def sampled(run, capsys, *options: str) -> str:
    assert main(["sample", f"--out_dir={run}", "--device=cpu", "--num_samples=1", "--max_new_tokens=24",
                 "--temperature=0", "--start=Shall I", *options]) == 0
    return capsys.readouterr().out


def test_sample_with_int8_mostly_agrees_with_float32(run, capsys):
    fp32, int8 = sampled(run, capsys), sampled(run, capsys, "--quantize=int8")
    assert len(fp32) == len(int8)
    assert agreement(fp32, int8) >= 0.8
    bf16 = sampled(run, capsys, "--quantize=int8", "--dtype=bfloat16")
    assert agreement(fp32, bf16) >= 0.8


def test_eval_val_loss_with_int8_is_within_one_percent_of_float32(run, tmp_path):
    def val_loss(quantize: str) -> float:
        opts = apply_overrides(EvalOptions(), {"out_dir": str(run), "task": "val", "device": "cpu",
                                               "dtype": "float32", "progress": False, "quantize": quantize,
                                               "to": str(tmp_path / f"eval-{quantize}.json")})
        return evaluate(opts, out=io.StringIO())["val"]["loss"]

    fp32, int8 = val_loss("none"), val_loss("int8")
    assert int8 != fp32 and abs(int8 - fp32) / fp32 < 0.01


def test_a_served_int8_request_mostly_agrees_with_float32(run):
    from gptforge.serve.app import create_app
    from gptforge.serve.engine import Engine
    from gptforge.serve.server import ServeOptions, serve_in_thread

    opts = ServeOptions(out_dir=str(run), quantize="int8", max_batch=2)
    source = opts.load()
    model = decoding_model(source.model, *opts.placement(), opts.quantize)
    assert isinstance(model.lm_head, Int8Linear)
    engine = Engine(model, source.tokenizer, opts.max_batch, opts.max_queue, opts.batch_invariant)
    with serve_in_thread(create_app(engine, "tiny", opts), request_timeout=30) as url:
        response = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"prompt": "Shall I", "max_tokens": 24, "temperature": 0})
    assert response.status_code == 200, response.text
    text = response.json()["choices"][0]["text"]
    reference = load_source("resume", str(run)).model.eval()
    ids = source.tokenizer.encode("Shall I")
    expected = reference.generate(torch.tensor([ids]), 24, temperature=0)[0, len(ids):]
    assert agreement(text, source.tokenizer.decode(expected.tolist())) >= 0.8


@pytest.mark.parametrize("command", ["sample", "chat", "eval", "serve"])
@pytest.mark.parametrize(("options", "message"), [
    (["--quantize=int4"], "--quantize='int4' is not one of none, int8"),
    (["--quantize=int8", "--dtype=float16"], "--quantize=int8 works with --dtype=float32 or bfloat16"),
])
def test_bad_combinations_are_one_line_errors(command, options, message, capsys, tmp_path):
    assert main([command, f"--out_dir={tmp_path}", *options]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"gptforge {command}: error: ") and message in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_int8_on_another_device_is_a_one_line_error():
    with pytest.raises(GptforgeError, match=re.escape("--quantize=int8 runs on the CPU")):
        check_quantize("int8", "cuda", "bfloat16")


def test_the_quantized_model_is_a_gpt_to_every_caller():
    model = quantize(jittered(tiny_config()))
    assert isinstance(model, GPT)
    assert next(model.parameters()).dtype == torch.float32  # what the caches take their dtype from
