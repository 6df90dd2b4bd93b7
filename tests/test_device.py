"""Tests for gptforge.device: what "auto" resolves to, and the CPU allocator switch training turns on.

    .venv/bin/python -m pytest tests/test_device.py
"""

import platform
import resource

import pytest
import torch

from gptforge.config import TrainConfig
from gptforge.device import keep_freed_memory, resolve_compile


def test_compile_defaults_on_for_cuda_only():
    assert TrainConfig().compile is None
    assert resolve_compile(None, "cuda") and resolve_compile(None, "cuda:1")
    assert not resolve_compile(None, "cpu") and not resolve_compile(None, "mps")
    assert resolve_compile(True, "cpu") and not resolve_compile(False, "cuda")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="tunes glibc's allocator")
def test_freed_activation_memory_is_reused_without_page_faults():
    keep_freed_memory()
    for _ in range(3):  # the heap grows to hold the buffer once
        torch.empty(1 << 20).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(50):  # 4 MiB freed and allocated again, as a training step does with its activations
        torch.empty(1 << 20).fill_(1.0)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    assert faults < 50  # without the tuning each allocation faults in its 1024 pages again
