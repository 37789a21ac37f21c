"""Where and in which dtype the scorer runs: device and compute-dtype resolution."""
from __future__ import annotations

import torch

__all__ = ["resolve_device", "resolve_dtype"]

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



def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """The compute dtype: ``None``/"auto" is bfloat16 on CUDA and float32 on the CPU."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key not in _DTYPES:
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {dtype!r}")
        dtype = _DTYPES[key]
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    if device.type != "cuda" and dtype != torch.float32:
        raise ValueError(
            f"dtype {str(dtype).removeprefix('torch.')} needs a CUDA device (autocast runs on the GPU only); "
            "on the CPU the scorer runs in float32"
        )
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

