"""Cosine kernels: the per-position error map 1 - cos(a, b) over channels, and the flattened
per-sample cosine used by the reconstruction loss.

Every kernel loads its inputs in their own dtype and accumulates in float32 (bf16 arithmetic is
also wrong in Triton's interpreter, so the upcast right after the load is not optional). Strides
are passed explicitly, so NCHW, channels_last and sliced views all run without a copy: Triton
specialises stride-1 arguments, which gives coalesced loads along whichever dim is contiguous.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .dtypes import acc_dtype, tl_acc_dtype


# --------------------------------------------------------------------------------------------
# Per-position cosine error map
# --------------------------------------------------------------------------------------------
@triton.jit
def _cosine_map_fwd_kernel(
    A, B, ERR, STATS,
    C, HW, W,
    sa_b, sa_c, sa_h, sa_w,
    sb_b, sb_c, sb_h, sb_w,
    EPS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    h = (offs_p // W).to(tl.int64)
    w = (offs_p % W).to(tl.int64)
    a_pos = A + n * sa_b + h * sa_h + w * sa_w
    b_pos = B + n * sb_b + h * sb_h + w * sb_w

    # Accumulate element-wise products in a 2-D tile and reduce once at the end: one tree
    # reduction per output instead of one per channel block, and better rounding.
    dot = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    aa = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    bb = tl.zeros((BLOCK_P, BLOCK_C), dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        m = mask_p[:, None] & (offs_c[None, :] < C)
        x = tl.load(a_pos[:, None] + offs_c[None, :] * sa_c, mask=m, other=0.0).to(ACC)
        y = tl.load(b_pos[:, None] + offs_c[None, :] * sb_c, mask=m, other=0.0).to(ACC)
        dot += x * y
        aa += x * x
        bb += y * y
    dot_s = tl.sum(dot, axis=1)
    na = tl.sqrt(tl.sum(aa, axis=1))
    nb = tl.sqrt(tl.sum(bb, axis=1))
    # Same clamp as torch.nn.functional.cosine_similarity: each norm separately, at eps.
    cos = dot_s / (tl.maximum(na, EPS) * tl.maximum(nb, EPS))
    out = n * HW + offs_p
    tl.store(ERR + out, (1.0 - cos).to(ERR.dtype.element_ty), mask=mask_p)
    # Saved for the backward pass, so that it reads the features once: cos, |a|, |b|.
    total = tl.num_programs(1).to(tl.int64) * HW
    tl.store(STATS + out, cos, mask=mask_p)
    tl.store(STATS + total + out, na, mask=mask_p)
    tl.store(STATS + 2 * total + out, nb, mask=mask_p)


@triton.jit
def _cosine_map_bwd_kernel(
    A, B, GERR, STATS, GA, GB,
    C, HW, W,
    sa_b, sa_c, sa_h, sa_w,
    sb_b, sb_c, sb_h, sb_w,
    sga_b, sga_c, sga_h, sga_w,
    sgb_b, sgb_c, sgb_h, sgb_w,
    EPS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    ACC: tl.constexpr,
):
    pid_p = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_p = offs_p < HW
    h = (offs_p // W).to(tl.int64)
    w = (offs_p % W).to(tl.int64)
    out = n * HW + offs_p
    total = tl.num_programs(1).to(tl.int64) * HW
    g = tl.load(GERR + out, mask=mask_p, other=0.0).to(ACC)
    cos = tl.load(STATS + out, mask=mask_p, other=0.0)
    na = tl.load(STATS + total + out, mask=mask_p, other=1.0)
    nb = tl.load(STATS + 2 * total + out, mask=mask_p, other=1.0)
    na_c = tl.maximum(na, EPS)
    nb_c = tl.maximum(nb, EPS)
    # d(1 - cos)/da = -(b / (|a||b|) - cos a / |a|^2); the second term vanishes where the norm
    # was clamped, because the clamped norm is a constant there.
    k_ab = -g / (na_c * nb_c)
    k_aa = tl.where(na > EPS, g * cos / (na_c * na_c), 0.0)
    k_bb = tl.where(nb > EPS, g * cos / (nb_c * nb_c), 0.0)

    a_pos = A + n * sa_b + h * sa_h + w * sa_w
    b_pos = B + n * sb_b + h * sb_h + w * sb_w
    ga_pos = GA + n * sga_b + h * sga_h + w * sga_w
    gb_pos = GB + n * sgb_b + h * sgb_h + w * sgb_w
    for c0 in range(0, C, BLOCK_C):
        offs_c = (c0 + tl.arange(0, BLOCK_C)).to(tl.int64)
        m = mask_p[:, None] & (offs_c[None, :] < C)
        x = tl.load(a_pos[:, None] + offs_c[None, :] * sa_c, mask=m, other=0.0).to(ACC)
        y = tl.load(b_pos[:, None] + offs_c[None, :] * sb_c, mask=m, other=0.0).to(ACC)
        ga = k_ab[:, None] * y + k_aa[:, None] * x
        gb = k_ab[:, None] * x + k_bb[:, None] * y
        tl.store(ga_pos[:, None] + offs_c[None, :] * sga_c, ga.to(GA.dtype.element_ty), mask=m)
        tl.store(gb_pos[:, None] + offs_c[None, :] * sgb_c, gb.to(GB.dtype.element_ty), mask=m)


def _map_blocks(a: torch.Tensor) -> tuple[int, int, int]:
    """Tile sizes (positions x channels, ~4K elements per tile and operand) and warps per tile.

    Where channels are the contiguous dim (channels_last), a wide channel block gives long
    contiguous loads; where positions are (NCHW), a wide position block does. Warps follow
    Triton's tutorials (one per 256 tile elements, at most 8): at the default 4, the forward's
    three float32 accumulator tiles alone take 96 registers per thread, and sm_90 builds of the
    kernels reached the 255-register limit (tests/gpu_compile.py prints them).
    """
    N, C, H, W = a.shape
    if a.stride(1) == 1 and C > 1:
        block_c = min(64, triton.next_power_of_2(C))
        block_p = max(16, 4096 // block_c)
    else:
        # Deep layers have few positions (16x16 at 256 px): shrink the position block so that a
        # batch still spreads over a few hundred programs, and widen the channel block to keep
        # each tile big.
        positions = N * H * W
        block_p = 256
        while block_p > 32 and positions // block_p < 512:
            block_p //= 2
        block_c = max(1, min(4096 // block_p, 64, triton.next_power_of_2(C)))
    return block_p, block_c, min(max(block_p * block_c // 256, 1), 8)


def cosine_map_forward(a: torch.Tensor, b: torch.Tensor, eps: float, out_dtype: torch.dtype, err=None, stats=None):
    """Launch the forward kernel. Returns (err (B,H,W) in out_dtype, stats (3,B,H,W) float32).

    ``err``/``stats`` may be given (contiguous), which the tests use to guard against stray writes.
    """
    assert a.dim() == 4 and a.shape == b.shape, (a.shape, b.shape)
    N, C, H, W = a.shape
    if err is None:
        err = a.new_empty((N, H, W), dtype=out_dtype)
    if stats is None:
        stats = a.new_empty((3, N, H, W), dtype=acc_dtype(a.dtype))
    if err.numel() == 0:
        return err, stats
    block_p, block_c, num_warps = _map_blocks(a)
    grid = (triton.cdiv(H * W, block_p), N)
    _cosine_map_fwd_kernel[grid](
        a, b, err, stats, C, H * W, W,
        *a.stride(), *b.stride(),
        EPS=eps, BLOCK_P=block_p, BLOCK_C=block_c, ACC=tl_acc_dtype(a.dtype), num_warps=num_warps,
    )
    return err, stats


def cosine_map_backward(a, b, grad_err, stats, eps: float, grad_a=None, grad_b=None):
    """Launch the backward kernel. Returns (grad_a, grad_b) in the inputs' dtypes and layouts."""
    N, C, H, W = a.shape
    grad_a = torch.empty_like(a) if grad_a is None else grad_a
    grad_b = torch.empty_like(b) if grad_b is None else grad_b
    if grad_a.numel() == 0:
        return grad_a, grad_b
    grad_err = grad_err.contiguous()
    block_p, block_c, num_warps = _map_blocks(a)
    grid = (triton.cdiv(H * W, block_p), N)
    _cosine_map_bwd_kernel[grid](
        a, b, grad_err, stats, grad_a, grad_b, C, H * W, W,
        *a.stride(), *b.stride(), *grad_a.stride(), *grad_b.stride(),
        EPS=eps, BLOCK_P=block_p, BLOCK_C=block_c, ACC=tl_acc_dtype(a.dtype), num_warps=num_warps,
    )
    return grad_a, grad_b


# --------------------------------------------------------------------------------------------
# Flattened per-sample cosine (the reconstruction loss), as a split reduction
# --------------------------------------------------------------------------------------------
@triton.jit
def _flat_cosine_partials_kernel(
    A, B, PARTIALS, N, stride_a, stride_b, n_chunks,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = chunk.to(tl.int64) * CHUNK
    dot = tl.zeros((BLOCK,), dtype=ACC)
    aa = tl.zeros((BLOCK,), dtype=ACC)
    bb = tl.zeros((BLOCK,), dtype=ACC)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(A + row * stride_a + offs, mask=m, other=0.0).to(ACC)
        y = tl.load(B + row * stride_b + offs, mask=m, other=0.0).to(ACC)
        dot += x * y
        aa += x * x
        bb += y * y
    # Partials go to memory and are summed in a fixed order afterwards: deterministic, unlike
    # atomics, and the (rows, chunks, 3) buffer is tiny.
    base = PARTIALS + (row * n_chunks + chunk) * 3
    tl.store(base, tl.sum(dot, axis=0))
    tl.store(base + 1, tl.sum(aa, axis=0))
    tl.store(base + 2, tl.sum(bb, axis=0))


@triton.jit
def _flat_cosine_bwd_kernel(
    A, B, COEF, GA, GB, N, stride_a, stride_b,
    CHUNK: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr, NEED_A: tl.constexpr, NEED_B: tl.constexpr,
):
    chunk = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    start = chunk.to(tl.int64) * CHUNK
    # Per-row coefficients: grad_a = k_ab * b + k_aa * a, grad_b = k_ab * a + k_bb * b.
    k_ab = tl.load(COEF + row * 3)
    k_aa = tl.load(COEF + row * 3 + 1)
    k_bb = tl.load(COEF + row * 3 + 2)
    for i in range(0, CHUNK, BLOCK):
        offs = start + i + tl.arange(0, BLOCK)
        m = offs < N
        x = tl.load(A + row * stride_a + offs, mask=m, other=0.0).to(ACC)
        y = tl.load(B + row * stride_b + offs, mask=m, other=0.0).to(ACC)
        # Training needs only the reconstructions' gradient: skip the other write.
        if NEED_A:
            tl.store(GA + row * N + offs, (k_ab * y + k_aa * x).to(GA.dtype.element_ty), mask=m)
        if NEED_B:
            tl.store(GB + row * N + offs, (k_ab * x + k_bb * y).to(GB.dtype.element_ty), mask=m)


_FLAT_BLOCK = 1024
_FLAT_CHUNK = 8192


def flat_cosine_sums(a2d: torch.Tensor, b2d: torch.Tensor) -> torch.Tensor:
    """Per-row (a.b, |a|^2, |b|^2) of two (rows, N) matrices with unit inner stride -> (rows, 3)."""
    rows, N = a2d.shape
    n_chunks = max(1, triton.cdiv(N, _FLAT_CHUNK))
    partials = a2d.new_empty((rows, n_chunks, 3), dtype=acc_dtype(a2d.dtype))
    if rows == 0:
        return partials.sum(1)
    _flat_cosine_partials_kernel[(n_chunks, rows)](
        a2d, b2d, partials, N, a2d.stride(0), b2d.stride(0), n_chunks,
        CHUNK=_FLAT_CHUNK, BLOCK=_FLAT_BLOCK, ACC=tl_acc_dtype(a2d.dtype),
    )
    return partials.sum(1)


def flat_cosine_backward(a2d, b2d, coef, grad_a=None, grad_b=None, need_a=True, need_b=True):
    """grad_a = k_ab b + k_aa a and grad_b = k_ab a + k_bb b per row, in one pass -> (rows, N) x2.

    A gradient that is not needed is returned as None and never written."""
    rows, N = a2d.shape
    grad_a = (a2d.new_empty((rows, N)) if grad_a is None else grad_a) if need_a else None
    grad_b = (b2d.new_empty((rows, N)) if grad_b is None else grad_b) if need_b else None
    if rows == 0 or N == 0 or not (need_a or need_b):
        return grad_a, grad_b
    n_chunks = triton.cdiv(N, _FLAT_CHUNK)
    _flat_cosine_bwd_kernel[(n_chunks, rows)](
        a2d, b2d, coef.contiguous(), grad_a if need_a else grad_b, grad_b if need_b else grad_a, N,
        a2d.stride(0), b2d.stride(0),
        CHUNK=_FLAT_CHUNK, BLOCK=_FLAT_BLOCK, ACC=tl_acc_dtype(a2d.dtype), NEED_A=int(need_a), NEED_B=int(need_b),
    )
    return grad_a, grad_b
