"""Argument checks that run before any kernel: errors name the argument and the shapes."""
from __future__ import annotations

import math
import operator
from typing import Sequence

import numpy as np
import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_float_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")


def check_pair(a, b, name_a: str, name_b: str, ndim: int | None = None) -> None:
    check_float_tensor(a, name_a)
    check_float_tensor(b, name_b)
    if ndim is not None and a.dim() != ndim:
        raise ValueError(f"{name_a} must have {ndim} dims (B, C, H, W), got shape {tuple(a.shape)}")
    if a.dim() < 1:
        raise ValueError(f"{name_a} needs a batch dim, got a 0-d tensor")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.numel() == 0:
        raise ValueError(f"{name_a} is empty (shape {tuple(a.shape)}): nothing to compute")


def check_alike(tensors: Sequence[torch.Tensor], name: str) -> None:
    """Every tensor of one argument (the layers of a list) in one dtype on one device."""
    if len({t.dtype for t in tensors}) > 1 or len({t.device for t in tensors}) > 1:
        found = sorted({f"{t.dtype} on {t.device}" for t in tensors})
        raise ValueError(f"every layer in {name} must share one dtype and device, got {found}")


def check_layer_lists(xs, ys, name_x: str, name_y: str) -> tuple[list, list]:
    if isinstance(xs, torch.Tensor):
        xs = [xs]
    if isinstance(ys, torch.Tensor):
        ys = [ys]
    xs, ys = list(xs), list(ys)
    if len(xs) == 0:
        raise ValueError(f"{name_x} is empty: pass one tensor per layer")
    if len(xs) != len(ys):
        raise ValueError(f"{name_x} and {name_y} must have one tensor per layer each, got {len(xs)} and {len(ys)}")
    return xs, ys


def check_same_batch(tensors: Sequence[torch.Tensor], name: str) -> None:
    sizes = [t.shape[0] for t in tensors]
    # Compared, never hashed: under torch.export a dynamic batch is a SymInt, which a set would
    # specialise to the example's size (or refuse to hash).
    if any(s != sizes[0] for s in sizes[1:]):
        raise ValueError(f"every tensor in {name} must have the same batch size, got {sizes}")


def is_index_like(v) -> bool:
    """Python, NumPy and 0-d integer tensor ints (what evaluation loops pass), never bools.

    Wider than :func:`ckaad_fast.validation.is_int` on purpose: an op's argument is used at once,
    so a 0-d tensor is fine; a configuration field is saved (JSON, checkpoints), so it must be a
    plain integer.

    Decided by type, not by catching operator.index's TypeError: torch.compile in torch 2.11
    turns that TypeError into an internal error instead of letting the except clause see it.
    """
    if isinstance(v, bool):
        return False
    if isinstance(v, torch.Tensor):
        return v.dim() == 0 and not v.is_floating_point() and not v.is_complex() and v.dtype != torch.bool
    if isinstance(v, np.ndarray):
        return v.ndim == 0 and v.dtype.kind in "iu"
    return isinstance(v, int) or hasattr(type(v), "__index__")


def is_real(v) -> bool:
    """Python and NumPy real numbers (``np.float32(4)`` too), never bools. By type, as
    :func:`is_index_like`, for torch.compile's sake."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def real_arg(v, name: str, lo: float = 0.0, lo_open: bool = False, hi: float | None = None) -> float:
    """``v`` as a float when it is a finite real number ``>= lo`` (``> lo`` with ``lo_open``) and
    ``<= hi``; else a ValueError naming ``name``."""
    ok = is_real(v) and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (hi is None or v <= hi)
    if not ok:
        bound = f"{'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi is not None else "")
        raise ValueError(f"{name} must be a finite number {bound}, got {v!r}")
    return float(v)


def out_size_pair(out_size, name: str = "out_size") -> tuple[int, int]:
    """``out_size`` (an int or an (h, w) pair of ints) as an (h, w) tuple; errors call it ``name``."""
    if is_index_like(out_size):
        pair = (operator.index(out_size),) * 2
    elif (isinstance(out_size, (tuple, list)) or (isinstance(out_size, np.ndarray) and out_size.ndim == 1)) and (
            len(out_size) == 2 and all(is_index_like(v) for v in out_size)):
        pair = tuple(operator.index(v) for v in out_size)
    else:
        raise ValueError(f"{name} must be an int or an (h, w) pair of ints, got {out_size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be >= 1, got {out_size!r}")
    return pair
