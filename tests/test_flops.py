"""Tests for gptforge.flops: the peak-FLOPS and bandwidth table, the measured CPU peak, --peak_tflops.

    .venv/bin/python -m pytest tests/test_flops.py
"""

import pytest
import torch

from gptforge.flops import (
    PEAK_UNKNOWN,
    gpu_memory_bandwidth,
    gpu_peak_flops,
    measured_peak_flops,
    peak_flops_per_sec,
)


@pytest.mark.parametrize(
    ("name", "dtype", "tf32", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, False, 989),
        ("NVIDIA H100 PCIe", torch.bfloat16, False, 756),
        ("NVIDIA H100 NVL", torch.float16, False, 835),
        ("NVIDIA H200", torch.bfloat16, False, 989),
        ("NVIDIA A100-SXM4-80GB", torch.bfloat16, False, 312),
        ("NVIDIA A100-PCIE-40GB", torch.float32, True, 156),
        ("NVIDIA A100-PCIE-40GB", torch.float32, False, 19.5),
        ("NVIDIA A10", torch.bfloat16, False, 125),
        ("NVIDIA L4", torch.bfloat16, False, 121),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, False, 165),
    ],
)
def test_gpu_table(name, dtype, tf32, tflops):
    assert gpu_peak_flops(name, dtype, tf32) == pytest.approx(tflops * 1e12)


def test_unknown_gpus_and_dtypes_give_none():
    assert gpu_peak_flops("NVIDIA A10G", torch.bfloat16) is None  # not the A10, nor the A100
    assert gpu_peak_flops("Mystery Accelerator 9000", torch.float32) is None
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", torch.bfloat16) is None  # no bf16 tensor cores


def test_cpu_peak_is_measured_and_can_be_overridden(monkeypatch):
    measured = measured_peak_flops("cpu", torch.float32, n=256, repeats=3)
    assert 1e8 < measured < 1e13
    monkeypatch.setenv("GPTFORGE_PEAK_FLOPS", "2e12")
    assert peak_flops_per_sec(torch.device("cpu"), torch.float32) == 2e12
    assert peak_flops_per_sec(torch.device("meta"), torch.float32) == 2e12
    monkeypatch.delenv("GPTFORGE_PEAK_FLOPS")
    assert peak_flops_per_sec(torch.device("meta"), torch.float32) is None


def test_memory_bandwidth_by_gpu_name():
    assert gpu_memory_bandwidth("NVIDIA H200") == pytest.approx(4.8e12)
    assert gpu_memory_bandwidth("NVIDIA H100 80GB HBM3") == pytest.approx(3.35e12)
    assert gpu_memory_bandwidth("NVIDIA A100-SXM4-80GB") == pytest.approx(2.0e12)
    assert gpu_memory_bandwidth("NVIDIA A100-SXM4-40GB") == pytest.approx(1.555e12)
    assert gpu_memory_bandwidth("NVIDIA L40S") == pytest.approx(0.864e12)
    assert gpu_memory_bandwidth("Mystery Accelerator 9000") is None


def test_mfu_uses_the_gpu_s_own_peak_and_says_when_it_has_none(monkeypatch):
    monkeypatch.delenv("GPTFORGE_PEAK_FLOPS", raising=False)
    for name, tflops in (("NVIDIA H100 PCIe", 756), ("NVIDIA H200", 989), ("NVIDIA L4", 121)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert peak_flops_per_sec(torch.device("cuda"), torch.bfloat16) == pytest.approx(tflops * 1e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "NVIDIA A10G")
    assert peak_flops_per_sec(torch.device("cuda"), torch.bfloat16) is None
    assert peak_flops_per_sec(torch.device("mps"), torch.float32) is None
    assert peak_flops_per_sec(torch.device("mps"), torch.float32, peak_tflops=13.6) == pytest.approx(13.6e12)
    assert PEAK_UNKNOWN == "peak unknown, pass --peak_tflops"
