"""Peaks of the device a model runs on: FLOPS, the denominator of model FLOPs utilization (MFU), and memory
bandwidth, the denominator of a decode step's bandwidth utilization.

GPU peaks are the vendors' dense (no sparsity) tensor-core figures per dtype, looked up by the device's name.
A CPU has no such figure that means anything for PyTorch, so its peak is measured: the best rate of a large
matmul in that dtype on this machine. MPS and GPUs missing from the table have none ("peak unknown"):
`--peak_tflops` or `GPTFORGE_PEAK_FLOPS` gives it, and overrides the others.
"""

import functools
import os
import re
import time

import torch

TFLOPS, TBPS = 1e12, 1e12
# (regex on torch.cuda.get_device_name(), {dtype: dense peak TFLOPS}, memory bandwidth in TB/s); the first
# match wins. bf16/fp16 are tensor-core rates with fp32 accumulation (what autocast training uses).
GPU_PEAKS: list[tuple[str, dict[str, float], float]] = [
    (r"\bB200\b", {"bf16": 2250, "fp16": 2250, "tf32": 1100, "fp32": 80}, 8.0),
    (r"\bGH200\b", {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67}, 4.0),
    (r"\bH200\b", {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67}, 4.8),
    (r"\bH100\b.*\bPCIe\b", {"bf16": 756, "fp16": 756, "tf32": 378, "fp32": 51}, 2.0),
    (r"\bH100\b.*\bNVL\b", {"bf16": 835, "fp16": 835, "tf32": 418, "fp32": 60}, 3.9),
    (r"\bH100\b", {"bf16": 989, "fp16": 989, "tf32": 494, "fp32": 67}, 3.35),  # SXM
    (r"\bA100\b.*\b80GB\b", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 2.0),
    (r"\bA100\b", {"bf16": 312, "fp16": 312, "tf32": 156, "fp32": 19.5}, 1.555),
    (r"\bL40S\b", {"bf16": 362, "fp16": 362, "tf32": 183, "fp32": 91.6}, 0.864),
    (r"\bL40\b", {"bf16": 181, "fp16": 181, "tf32": 90.5, "fp32": 90.5}, 0.864),
    (r"\bL4\b", {"bf16": 121, "fp16": 121, "tf32": 60, "fp32": 30.3}, 0.3),
    (r"\bA10\b", {"bf16": 125, "fp16": 125, "tf32": 62.5, "fp32": 31.2}, 0.6),
    (r"\bRTX A6000\b", {"bf16": 155, "fp16": 155, "tf32": 77.4, "fp32": 38.7}, 0.768),
    (r"\bRTX 4090\b", {"bf16": 165, "fp16": 165, "tf32": 82.6, "fp32": 82.6}, 1.008),
    (r"\bRTX 3090\b", {"bf16": 71, "fp16": 71, "tf32": 35.6, "fp32": 35.6}, 0.936),
    (r"\bV100\b", {"fp16": 125, "fp32": 15.7}, 0.9),
    (r"\bT4\b", {"fp16": 65, "fp32": 8.1}, 0.32),
    (r"\bMI300X\b", {"bf16": 1307, "fp16": 1307, "tf32": 654, "fp32": 163}, 5.3),
]
PEAK_UNKNOWN = "peak unknown, pass --peak_tflops"
_DTYPE_KEYS = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def gpu_peak_flops(device_name: str, dtype: torch.dtype, tf32: bool = False) -> float | None:
    """Dense peak FLOPS of a GPU by name for `dtype` (fp32 matmuls count as TF32 when `tf32`), or None."""
    key = _DTYPE_KEYS.get(dtype)
    if key == "fp32" and tf32:
        key = "tf32"
    for pattern, peaks, _ in GPU_PEAKS:
        if re.search(pattern, device_name):
            return peaks[key] * TFLOPS if key in peaks else None
    return None


def gpu_memory_bandwidth(device_name: str) -> float | None:
    """Peak memory bandwidth of a GPU by name in bytes/s, or None: the ceiling of a decode step, which streams
    every weight (and the KV cache) once per token."""
    return next((bw * TBPS for pattern, _, bw in GPU_PEAKS if re.search(pattern, device_name)), None)


@functools.cache
def measured_peak_flops(device_type: str, dtype: torch.dtype, n: int = 1024, repeats: int = 10) -> float:
    """Best FLOPS of an n x n matmul on this device and dtype: the practical ceiling PyTorch reaches here."""
    # values do not matter for timing; filling with constants leaves the global RNG (training's dropout) alone
    a = torch.full((n, n), 0.5, device=device_type, dtype=dtype)
    b = torch.full((n, n), 0.25, device=device_type, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops_per_sec(
    device: torch.device, dtype: torch.dtype, peak_tflops: float | None = None
) -> float | None:
    """Peak FLOPS for MFU on `device` computing in `dtype`: `peak_tflops` (the --peak_tflops option) or the
    GPTFORGE_PEAK_FLOPS override, the GPU table, measured on a CPU, else None (MPS, an unknown GPU)."""
    if peak_tflops:
        return peak_tflops * TFLOPS
    if override := os.environ.get("GPTFORGE_PEAK_FLOPS"):
        return float(override)
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32
        return gpu_peak_flops(torch.cuda.get_device_name(device), dtype, tf32)
    if device.type == "cpu":
        return measured_peak_flops("cpu", dtype)
    return None
