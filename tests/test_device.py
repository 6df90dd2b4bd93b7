"""Tests for gptforge.device: what "auto" resolves to (on pretend CUDA and MPS machines too), the line that
says so, and the CPU allocator switch training turns on.

    .venv/bin/python -m pytest tests/test_device.py
"""

import platform
import subprocess
import sys

import pytest
import torch
from conftest import tiny_config

from gptforge import GPT
from gptforge.config import TrainConfig
from gptforge.device import describe_choices, resolve_compile, resolve_device, resolve_dtype
from gptforge.errors import GptforgeError


def test_compile_defaults_on_for_cuda_only():
    assert TrainConfig().compile is None
    assert resolve_compile(None, "cuda") and resolve_compile(None, "cuda:1")
    assert not resolve_compile(None, "cpu") and not resolve_compile(None, "mps")
    assert resolve_compile(True, "cpu") and not resolve_compile(False, "cuda")


FREED_MEMORY_PROBE = """
import resource, torch
from gptforge.device import keep_freed_memory
keep_freed_memory()
# the heap grows until freed chunks fit the next request (about 10 rounds of aligned 4 MiB)
for _ in range(20):
    torch.empty(1 << 20).fill_(1.0)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):  # 4 MiB freed and allocated again, as a training step does with its activations
    torch.empty(1 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_freed_activation_memory_is_reused_without_page_faults():
    # a fresh process, as a training run is: other tests leave this one's heap in any state
    faults = int(subprocess.run([sys.executable, "-c", FREED_MEMORY_PROBE], capture_output=True, text=True,
                                check=True).stdout)
    assert faults < 50  # without the tuning each allocation faults in its 1024 pages again


@pytest.mark.parametrize("device", ["tpu", "gpu", "cuda:x", "meta", "", "cpu cuda"])
def test_a_device_torch_or_gptforge_does_not_know_names_the_choices(device):
    with pytest.raises(GptforgeError,
                       match="is not a device gptforge runs on: use cpu, cuda, cuda:N, mps or auto"):
        resolve_device(device)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_on_a_machine_without_one_says_what_to_use(device):
    with pytest.raises(GptforgeError, match=rf"^--device={device}: .*; use --device=cpu, or --device=auto"):
        resolve_device(device)


def test_auto_takes_what_the_machine_has():
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert resolve_device("auto") == expected and resolve_device("cpu") == "cpu"


@pytest.fixture
def machine(monkeypatch):
    """A pretend machine: which accelerators torch sees, and whether its GPU has bf16."""

    def pretend(cuda: bool = False, mps: bool = False, bf16: bool = True) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)

    return pretend


@pytest.mark.parametrize(
    ("cuda", "mps", "bf16", "device", "dtype", "compile"),
    [
        (True, True, True, "cuda", "bfloat16", True),  # CUDA first, even beside MPS
        (True, False, False, "cuda", "float16", True),  # a GPU without bf16 (V100, T4): fp16 + GradScaler
        (False, True, True, "mps", "float32", False),  # MPS: fp32 (half precision NaNs in some ops), eager
        (False, False, True, "cpu", "float32", False),
    ],
)
def test_auto_picks_device_dtype_and_compile_by_what_the_machine_has(machine, cuda, mps, bf16, device, dtype,
                                                                       compile):
    machine(cuda=cuda, mps=mps, bf16=bf16)
    assert resolve_device("auto") == device
    assert resolve_dtype("auto", device) == dtype
    assert resolve_compile(None, device) is compile


def test_explicit_choices_are_kept(machine):
    machine(cuda=True, bf16=False)
    assert resolve_device("cuda:0") == "cuda:0" and resolve_device("cpu") == "cpu"
    assert resolve_dtype("bfloat16", "cuda") == "bfloat16" and resolve_dtype("float16", "cpu") == "float16"
    machine(mps=False)
    with pytest.raises(GptforgeError, match="MPS is not available"):
        resolve_device("mps")


def test_the_choice_is_said_with_why_auto_chose_it():
    assert describe_choices(("auto", "auto", None), "cpu", "float32", False) == (
        "device cpu (auto: cuda, else mps, else cpu), dtype float32 (auto: fp32 on cpu), "
        "compile off (auto: CUDA only)"
    )
    assert describe_choices(("auto", "auto", None), "cuda", "float16", True) == (
        "device cuda (auto: cuda, else mps, else cpu), dtype float16 (auto: no bf16 on this GPU: fp16 with a "
        "GradScaler), compile on (auto: CUDA only)"
    )
    assert describe_choices(("cuda:1", "bfloat16", False), "cuda:1", "bfloat16", False) == (
        "device cuda:1, dtype bfloat16, compile off"
    )


def test_adamw_is_fused_on_cuda_and_cpu_but_not_on_mps():
    model = GPT(tiny_config())
    for device, fused in (("cuda", True), ("cpu", True), ("mps", False)):
        optimizer = model.configure_optimizers(0.1, 1e-3, (0.9, 0.95), device)
        assert bool(optimizer.defaults["fused"]) is fused


def test_a_cpu_run_says_what_it_chose(tmp_path, capsys):
    from tiny_run import tiny_run

    tiny_run(tmp_path)
    out = capsys.readouterr().out
    assert "device cpu, dtype float32, compile off" in out
    assert "memory plan: parameters " in out
