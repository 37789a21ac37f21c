"""Hinge energy kernels: mean(|s|) ("low" energy) or mean(max(0, margin - |s|)) ("high").

The forward is a split reduction into per-program partials (summed afterwards in a fixed order,
so results are deterministic); the backward is one element-wise pass. Both treat the scores as
a flat buffer: the mean does not care about layout, so any dense tensor runs without a copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dtypes import acc_dtype, tl_acc_dtype


@triton.jit
def _energy_term(s, margin, HIGH: tl.constexpr):
    e = tl.abs(s)
    if HIGH:
        t = margin - e
        # max(0, t) that keeps NaN, as torch.relu does (tl.maximum may drop it).
        e = tl.where(t > 0.0, t, tl.where(t != t, t, 0.0))
    return e


@triton.jit
def _energy_partials_kernel(
    S, PARTIALS, N, MARGIN: tl.constexpr, HIGH: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr
):
    chunk = tl.program_id(0)
    start = chunk.to(tl.int64) * CHUNK
    acc = tl.zeros((BLOCK,), dtype=ACC)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        s = tl.load(S + offs, mask=m, other=0.0).to(ACC)
        acc += tl.where(m, _energy_term(s, MARGIN, HIGH), 0.0)
    tl.store(PARTIALS + chunk, tl.sum(acc, axis=0))


@triton.jit
def _energy_bwd_kernel(S, GS, N, scale_ptr, MARGIN: tl.constexpr, HIGH: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    # The upstream gradient divided by N, read from memory so that no .item() is needed.
    scale = tl.load(scale_ptr).to(ACC)
    s = tl.load(S + offs, mask=m, other=0.0).to(ACC)
    # sign(s), 0 at 0 and at NaN: what autograd's abs backward gives.
    sign = tl.where(s > 0.0, 1.0, tl.where(s < 0.0, -1.0, 0.0))
    if HIGH:
        # d/ds max(0, margin - |s|) = -sign(s) where margin - |s| > 0, as relu's backward.
        g = tl.where(MARGIN - tl.abs(s) > 0.0, -sign, 0.0)
    else:
        g = sign
    tl.store(GS + offs, (g * scale).to(GS.dtype.element_ty), mask=m)


_BLOCK = 1024
_CHUNK = 16384


def energy_sum(flat: torch.Tensor, margin: float, high: bool) -> torch.Tensor:
    """Sum over a flat buffer of |s| or max(0, margin - |s|), as a 0-d float32 (float64) tensor."""
    N = flat.numel()
    n_chunks = max(1, triton.cdiv(N, _CHUNK))
    partials = flat.new_empty((n_chunks,), dtype=acc_dtype(flat.dtype))
    if N == 0:
        return partials.zero_().sum()
    _energy_partials_kernel[(n_chunks,)](flat, partials, N, MARGIN=margin, HIGH=int(high), CHUNK=_CHUNK, BLOCK=_BLOCK, ACC=tl_acc_dtype(flat.dtype))
    return partials.sum()


def energy_backward(flat: torch.Tensor, scale: torch.Tensor, margin: float, high: bool, grad=None) -> torch.Tensor:
    """Gradient of the energy sum times ``scale`` (a 0-d tensor), same shape as ``flat``."""
    grad = torch.empty_like(flat) if grad is None else grad
    N = flat.numel()
    if N == 0:
        return grad
    _energy_bwd_kernel[(triton.cdiv(N, _BLOCK),)](
        flat, grad, N, scale.reshape(1).contiguous(), MARGIN=margin, HIGH=int(high), BLOCK=_BLOCK, ACC=tl_acc_dtype(flat.dtype)
    )
    return grad
