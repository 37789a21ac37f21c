"""Bilinear upsampling + separable Gaussian blur of small maps, as two matrix products.

Both steps are linear and separable, so for a map M (h x w) the result is R @ M @ C^T, with
R = G_rows U_rows (Ho x h) and C = G_cols U_cols (Wo x w) folding interpolation and the
border-aware blur into one matrix per axis (built once per size by the op layer). Summing layers
is accumulation into the same output tile: out = sum_s R_s M_s C_s^T.

One program owns one (BLOCK_M x BLOCK_N) tile of one image's output. For each K-block of rows
of M it forms T = M[k-block, :] @ C^T[:, tile] and accumulates R[tile, k-block] @ T, so the
upsampled map never reaches memory. The maps are tiny (a few K floats per layer), so the cost is
the output write, and the matmuls run in full fp32 ("ieee") to stay exact.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _upsample_blur_kernel(
    M, R, CT, OUT,
    h, w, Ho, Wo,
    sm_b, sm_h, sm_w,
    ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_J: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = rows < Ho
    mask_c = cols < Wo
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, h, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        mask_k = ks < h
        t = tl.zeros((BLOCK_K, BLOCK_N), dtype=tl.float32)
        for j0 in range(0, w, BLOCK_J):
            js = j0 + tl.arange(0, BLOCK_J)
            mask_j = js < w
            m_tile = tl.load(
                M + n * sm_b + ks[:, None] * sm_h + js[None, :] * sm_w,
                mask=mask_k[:, None] & mask_j[None, :], other=0.0,
            ).to(tl.float32)
            c_tile = tl.load(CT + js[:, None] * Wo + cols[None, :], mask=mask_j[:, None] & mask_c[None, :], other=0.0)
            t += tl.dot(m_tile, c_tile, input_precision="ieee")
        r_tile = tl.load(R + rows[:, None] * h + ks[None, :], mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        acc += tl.dot(r_tile, t, input_precision="ieee")
    out_ptrs = OUT + n * Ho * Wo + rows[:, None] * Wo + cols[None, :]
    mask = mask_r[:, None] & mask_c[None, :]
    if ACCUMULATE:
        acc += tl.load(out_ptrs, mask=mask, other=0.0)
    tl.store(out_ptrs, acc, mask=mask)


def _block(n: int, cap: int) -> int:
    # tl.dot needs every block dim >= 16.
    return max(16, min(cap, triton.next_power_of_2(n)))


def upsample_blur_sum(maps: list[torch.Tensor], row_mats: list[torch.Tensor], col_mats_t: list[torch.Tensor],
                      out_h: int, out_w: int, out=None) -> torch.Tensor:
    """sum_s R_s @ maps[s] @ CT_s for float32 maps (B, h_s, w_s) -> (B, out_h, out_w) float32.

    ``row_mats[s]`` is (out_h, h_s) and ``col_mats_t[s]`` is (w_s, out_w), both contiguous float32.
    """
    N = maps[0].shape[0]
    if out is None:
        out = maps[0].new_empty((N, out_h, out_w), dtype=torch.float32)
    if out.numel() == 0:
        return out
    block_m, block_n = _block(out_h, 64), _block(out_w, 64)
    grid = (triton.cdiv(out_h, block_m), triton.cdiv(out_w, block_n), N)
    for s, (m, r, ct) in enumerate(zip(maps, row_mats, col_mats_t)):
        h, w = m.shape[1], m.shape[2]
        # Launches for successive layers run in stream order, so accumulating is race-free.
        _upsample_blur_kernel[grid](
            m, r, ct, out, h, w, out_h, out_w, *m.stride(),
            ACCUMULATE=int(s > 0),
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_block(h, 32), BLOCK_J=_block(w, 32),
        )
    return out
