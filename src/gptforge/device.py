"""Where and in what a model runs: device, dtype and torch.compile resolution, and the per-device switches.

Every command that places a model (train, bench, sample, eval, serve) resolves `--device`, `--dtype` and
`--compile` here, so "auto" means the same everywhere and a device this machine lacks is one clear error. This
module knows torch and nothing of models, data or commands.
"""

import ctypes

import torch

from gptforge.errors import GptforgeError

# The compute dtypes a command may name, and their torch types.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_CHOICES = ("auto", *DTYPES)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def resolve_device(device: str) -> str:
    """'auto' becomes what this machine has: cuda, else mps, else cpu. A device this machine lacks, or a name
    torch does not know, is an error saying what there is instead."""
    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    try:
        kind, index = torch.device(device).type, torch.device(device).index
    except (RuntimeError, TypeError):
        kind, index = None, None
    if kind not in ("cpu", "cuda", "mps"):
        raise GptforgeError(f"--device={device!r} is not a device gptforge runs on: "
                            "use cpu, cuda, cuda:N, mps or auto")
    if kind == "cuda" and not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA GPU"
        raise GptforgeError(f"--device={device}: {why}; "
                            "use --device=cpu, or --device=auto to take what there is")
    if kind == "cuda" and index is not None and index >= torch.cuda.device_count():
        raise GptforgeError(f"--device={device}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise GptforgeError(f"--device={device}: Apple's MPS is not available here; "
                            "use --device=cpu or --device=auto")
    return device


def resolve_compile(compile: bool | None, device: str) -> bool:
    """None becomes True on CUDA, where compiled kernels pay; eager elsewhere."""
    return device.startswith("cuda") if compile is None else compile


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' follows the device: bf16 on CUDA where supported, else fp16 (with a GradScaler);
    fp32 elsewhere."""
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    return "float32"


def describe_choices(asked: tuple[str, str, bool | None], device: str, dtype: str, compile: bool) -> str:
    """One line saying what a run runs on and in, and why where "auto" chose: `asked` is the (device, dtype,
    compile) options as given, the rest their resolutions."""
    asked_device, asked_dtype, asked_compile = asked
    why_dtype = {"bfloat16": "this GPU has bf16", "float16": "no bf16 on this GPU: fp16 with a GradScaler",
                 "float32": f"fp32 on {device_type(device)}"}[dtype]
    parts = [
        f"device {device}" + (" (auto: cuda, else mps, else cpu)" if asked_device == "auto" else ""),
        f"dtype {dtype}" + (f" (auto: {why_dtype})" if asked_dtype == "auto" else ""),
        f"compile {'on' if compile else 'off'}" + (" (auto: CUDA only)" if asked_compile is None else ""),
    ]
    return ", ".join(parts)


def check_dtype(dtype: str) -> None:
    """A dtype option's value must be auto or one of DTYPES."""
    if dtype not in DTYPE_CHOICES:
        raise GptforgeError(f"--dtype={dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")


def torch_dtype(dtype: str) -> torch.dtype:
    """The torch dtype of a resolved dtype name."""
    return DTYPES[dtype]


def device_type(device: str) -> str:
    """'cuda' for cuda:N, else the device's kind ('cpu', 'mps'): what autocast and GradScaler take."""
    return torch.device(device).type


def enable_tf32() -> None:
    """TF32 matmuls and convolutions on Ampere and later: float32 training at tensor-core speed."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def keep_freed_memory() -> None:
    """On glibc, let freed activation memory be reused instead of handed back to the OS after every step.

    A CPU step frees and reallocates the same activation buffers each iteration; past glibc's mmap and trim
    thresholds each comes back as fresh pages that fault in and are zeroed again: over a thousand page faults
    per step of the CPU quick start, about a tenth of its time (docs/benchmarks.md). Raised thresholds keep
    those pages in the heap, as a caching allocator (jemalloc, tcmalloc, PyTorch's own on CUDA) would.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc: nothing to tune
    libc.mallopt(M_MMAP_THRESHOLD, 1 << 28)
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
