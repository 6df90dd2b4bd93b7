"""Tests for gptforge.device: what "auto" resolves to, and the CPU allocator switch training turns on.

    .venv/bin/python -m pytest tests/test_device.py
"""

import platform
import subprocess
import sys

import pytest
import torch

from gptforge.config import TrainConfig
from gptforge.device import resolve_compile, resolve_device
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
