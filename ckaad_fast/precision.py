"""Where and in which precision the networks run: one vocabulary for train, score, calibrate,
eval and export, and one answer to "is this device usable".

Precision names: ``"float32"``, ``"bfloat16"``, ``"float16"``, and ``"auto"`` (the fastest that
keeps scores within bfloat16 rounding: bfloat16 on CUDA and on a CPU with bfloat16 matrix units,
float32 on any other CPU). The aliases ``fp32``, ``none`` (training's "no mixed precision"),
``bf16``, ``fp16`` and ``half`` are accepted everywhere and mean the same. The precision is that
of the backbone and the auto-encoder (autocast); the anomaly maps and the scores are float32
whatever it is.

A precision changes the scores (bfloat16 moves them by about 1e-3 relative, up to 3e-2 on real
models): a calibration records the one it was computed in (:mod:`ckaad_fast.calibration`) and
scoring uses it unless told otherwise.

``"int8"`` (alias ``i8``) is a precision of another kind: not a dtype the networks are cast or
autocast to, but a quantized copy of the scoring graph that ``calibrate`` makes with NNCF and
OpenVINO runs (:mod:`ckaad_fast.runtime.quantize`). Only the functions that can honour it take it
(``int8=True``: calibrate, score, export); everywhere else it is refused with an error that says
where it belongs. Its torch marker is ``torch.int8``.
"""
from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

from .devices import cuda_usable, default_device
from .errors import ArgumentError

if TYPE_CHECKING:
    import torch

__all__ = ["PRECISIONS", "INT8", "canonical_precision", "torch_dtype", "resolve_precision", "precision_name", "autocast",
           "cpu_has_bf16_matmul", "resolve_device", "check_device_usable", "channels_last_for",
           "cuda_usable", "default_device"]

#: The precision names (aliases aside) every option and argument takes.
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
_ALIASES = {
    "auto": "auto",
    "float32": "float32", "fp32": "float32", "float": "float32", "none": "float32", "": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
# The precisions that are torch dtypes (torch is imported only by what builds or runs a network:
# the names alone serve a deployment without it).
_DTYPES = ("float32", "bfloat16", "float16")
#: The quantized precision (see the module): its name, and torch.int8 as its marker.
INT8 = "int8"


def canonical_precision(name, argument: str = "precision", int8: bool = False) -> str:
    """``name`` (a precision name, an alias, a torch dtype or None for "auto") as one of
    :data:`PRECISIONS`, or "int8" where ``int8`` allows it; anything else raises an
    :class:`~ckaad_fast.errors.ArgumentError` naming ``argument``."""
    if name is None:
        return "auto"
    if _is_torch_dtype(name):
        key = str(name).removeprefix("torch.")
        if key not in _DTYPES and key != INT8:
            raise ArgumentError(argument, f"must be float32, bfloat16 or float16, got {name}")
    else:
        key = str(name).lower().removeprefix("torch.")
        key = INT8 if key in (INT8, "i8") else key
        if key != INT8 and key not in _ALIASES:
            raise ArgumentError(argument, f"must be one of {', '.join(PRECISIONS)} (or fp32, bf16, fp16), got {name!r}")
    if key == INT8:
        if not int8:
            raise ArgumentError(argument, "int8 is a quantized copy of the scoring graph, made by ckaad-fast calibrate "
                                          "--dtype int8 and run by OpenVINO (score, export --format openvino); here "
                                          "use float32, bfloat16 or auto")
        return INT8
    return _ALIASES[key]


def _is_torch_dtype(value) -> bool:
    # A torch dtype exists only once torch is imported: no need to import it to ask.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.dtype)


def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX-512 BF16; Linux's
    /proc/cpuinfo flags), where bfloat16 pays off; oneDNN emulates it elsewhere."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    names = set(flags.split())
    import torch

    return bool({"amx_bf16", "avx512_bf16"} & names) and torch.backends.mkldnn.is_available()


def torch_dtype(name, argument: str = "precision", int8: bool = False) -> torch.dtype:
    """The torch dtype of a precision that names one (not "auto": that one depends on the device,
    see :func:`resolve_precision`); torch.int8 for "int8" where ``int8`` allows it."""
    key = canonical_precision(name, argument, int8)
    if key == "auto":
        raise ArgumentError(argument, f"must name one precision ({', '.join(_DTYPES)}), not auto")
    import torch

    return getattr(torch, key)  # torch.int8 for INT8


def resolve_precision(name, device, argument: str = "precision", int8: bool = False) -> torch.dtype:
    """The torch dtype ``name`` means on ``device`` ("auto" resolved as the module says); float16
    on a CPU is refused (no CPU multiplies it fast, and its range overflows features), and int8
    anywhere but on the CPU (OpenVINO runs it there) or where ``int8`` does not allow it."""
    import torch

    key = canonical_precision(name, argument, int8)
    device = torch.device(device)
    if key == "auto":
        return torch.bfloat16 if device.type == "cuda" or cpu_has_bf16_matmul() else torch.float32
    if key == "float16" and device.type != "cuda":
        raise ArgumentError(argument, "float16 needs a CUDA device; on the CPU use bfloat16 or float32")
    if key == INT8 and device.type != "cpu":
        raise ArgumentError(argument, f"int8 runs on the CPU (OpenVINO); on {device.type} use bfloat16 or float16")
    return torch_dtype(key, argument, int8)


def precision_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: what manifests, sidecars and calibrations record."""
    return canonical_precision(dtype, int8=True)


def autocast(device, dtype: torch.dtype):
    """The context the networks run in: autocast to ``dtype`` (no cast cache, so that nothing
    stale is captured into a CUDA graph), or nothing for float32."""
    import torch

    if dtype == torch.float32:
        return contextlib.nullcontext()
    if dtype == torch.int8:  # a quantized graph's marker, never an autocast type
        raise ArgumentError("precision", "int8 is run by OpenVINO's quantized graph, not by PyTorch's forward")
    return torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False)


def channels_last_for(device, dtype: torch.dtype) -> bool:
    """Whether the networks run in channels_last: on a GPU, and for oneDNN's bfloat16 on the CPU
    (where it is the fast layout). Every scoring path follows this one rule, since the layout
    picks the convolution algorithm and so the last bits of every score."""
    import torch

    return torch.device(device).type == "cuda" or dtype != torch.float32


def check_device_usable(device, argument: str = "device") -> torch.device:
    """``device`` as a torch.device of type cpu or cuda, refusing CUDA where there is none
    (:func:`ckaad_fast.devices.cuda_usable`)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ArgumentError(argument, f"unknown device {device!r} ({e})") from None
    if dev.type not in ("cpu", "cuda"):
        raise ArgumentError(argument, f"must be 'cpu' or 'cuda[:N]', got {str(dev)!r}")
    if dev.type == "cuda" and not cuda_usable():
        raise ArgumentError(argument, f"{str(device)!r} asked for, but CUDA is not available on this machine")
    return dev


def resolve_device(device) -> torch.device:
    """``device`` as a usable torch.device, a CUDA one with its index (the current GPU when none
    is given)."""
    import torch

    dev = check_device_usable(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev
