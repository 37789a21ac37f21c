"""Where and in which dtype the scorer runs: device and compute-dtype resolution."""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_dtype", "cpu_has_bf16_matmul"]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}



def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX-512 BF16; Linux's
    /proc/cpuinfo flags), where bfloat16 scoring pays off; oneDNN emulates it elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    names = set(flags.split())
    return bool({"amx_bf16", "avx512_bf16"} & names) and torch.backends.mkldnn.is_available()


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The compute dtype: ``None``/"auto" is bfloat16 on CUDA, and on a CPU with bfloat16 matrix
    units (:func:`cpu_has_bf16_matmul`: AMX or AVX-512 BF16), where bfloat16 autocast in
    channels_last scores about 3x faster than float32 (measured on a 2-core Xeon with AMX) with
    scores within about 1e-2 relative; float32 on any other CPU, where bfloat16 would be emulated.

    The dtype chosen is in the Scorer's ``repr`` and in every results folder's ``run.json``.
    ``"float32"`` forces float32 (the same scores on every CPU, and the dtype ``calibrate``
    and ``eval`` compute in); float16 needs a GPU.
    """
    if dtype is None or dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if cpu_has_bf16_matmul() else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
        dtype = _DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if device.type != "cuda" and dtype == torch.float16:
        raise ValueError("dtype float16 needs a CUDA device; on the CPU use bfloat16 or float32")
    return dtype


def resolve_device(device) -> torch.device:
    """``device`` as a torch.device: "cpu" or "cuda[:N]" (the current GPU when no index is given)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} asked for, but CUDA is not available on this machine")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise ValueError(f"device must be 'cpu' or 'cuda[:N]', got {str(device)!r}")
    return device

