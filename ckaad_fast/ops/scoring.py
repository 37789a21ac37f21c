"""Scoring ops: the fused anomaly map (cosine error + bilinear upsampling + Gaussian blur) and the
top-k image score.

Upsampling with align_corners=True and a Gaussian blur are both linear and separable, so the
blurred, upsampled map of a layer is R @ M @ C^T with two small matrices per size (R: out_h x h,
C: out_w x w) that fold interpolation and the border-aware blur together. They are built once in
float64 from scipy's exact rules and cached, and each image then costs a few tiny matrix products.
"""
from __future__ import annotations

import functools
import operator
from typing import Sequence

import numpy as np
import torch

from ..profiling import nvtx_range
from ..kernels import native as native_kernels
from ._backend import upsample_blur_kernels, use_native, use_triton
from ._double import wants_double_backward
from .checks import (
    check_alike,
    check_float_tensor,
    check_layer_lists,
    check_pair,
    check_same_batch,
    is_index_like,
    out_size_pair,
    real_arg,
)
from .cosine import cosine_error_map_float32, cosine_map_formula

BORDERS = ("reflect", "mirror")
_DEVICES = ("cpu", "cuda")
# Upfront bounds, since the blur matrices are dense: an (n, n) float64 matrix per output side, built
# from n * (2 radius + 1) taps. 4096 per side is 128 MiB per matrix; the taps' bound keeps a huge
# sigma from exhausting memory before anything is computed.
MAX_OUT_SIDE = 4096
MAX_BLUR_TAPS = 2**24
#: Maps larger than this many values take their top-k chunk by chunk (see image_score).
TOPK_CHUNK = 2**22


# --------------------------------------------------------------------------------------------
# The matrices
# --------------------------------------------------------------------------------------------
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of 1-D linear interpolation with align_corners=True:
    output i samples input position i (n_in - 1) / (n_out - 1); a size-1 input is a constant."""
    U = np.zeros((n_out, n_in))
    if n_in == 1:
        U[:, 0] = 1.0
        return U
    scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    pos = np.arange(n_out) * scale
    i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = pos - i0
    rows = np.arange(n_out)
    np.add.at(U, (rows, i0), 1.0 - frac)
    np.add.at(U, (rows, i1), frac)
    return U


def _border_index(j: np.ndarray, n: int, border: str) -> np.ndarray:
    """Where scipy.ndimage reads index j of a length-n line extended with ``border``.

    'reflect' repeats the edge pixel (d c b a | a b c d), period 2n; 'mirror' does not
    (d c b | a b c d), period 2n - 2. Radii larger than the line reflect again, as scipy does.
    """
    if border == "reflect":
        j = np.mod(j, 2 * n)
        return np.where(j >= n, 2 * n - 1 - j, j)
    if n == 1:
        return np.zeros_like(j)
    period = 2 * n - 2
    j = np.mod(j, period)
    return np.where(j >= n, period - j, j)


def gaussian_matrix(n: int, sigma: float, truncate: float = 4.0, border: str = "reflect") -> np.ndarray:
    """(n, n) matrix of scipy.ndimage.gaussian_filter1d along a line of length n."""
    if sigma == 0:
        return np.eye(n)
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    taps /= taps.sum()
    G = np.zeros((n, n))
    rows = np.repeat(np.arange(n), x.size)
    src = _border_index(np.arange(n)[:, None] + x[None, :], n, border).reshape(-1)
    np.add.at(G, (rows, src), np.tile(taps, n))
    return G


@functools.lru_cache(maxsize=256)
def _axis_matrix_np(n_in: int, n_out: int, sigma: float, truncate: float, border: str) -> np.ndarray:
    return gaussian_matrix(n_out, sigma, truncate, border) @ bilinear_matrix(n_in, n_out)


def upsample_blur_matrix(n_in: int, n_out: int, sigma: float, truncate: float = 4.0,
                         border: str = "reflect") -> np.ndarray:
    """(n_out, n_in) float64 matrix of one axis of :func:`upsample_blur_sum`: bilinear upsampling
    (align_corners=True) then the Gaussian blur with scipy's border rule. A map M (h, w) becomes
    ``R @ M @ C.T`` with ``R = upsample_blur_matrix(h, out_h, ...)`` and ``C`` likewise for w:
    what exporters use to write the op with standard operators."""
    return _axis_matrix_np(int(n_in), int(n_out), float(sigma), float(truncate), border).copy()


@functools.lru_cache(maxsize=256)
def _axis_matrix(n_in, n_out, sigma, truncate, border, device: torch.device, dtype: torch.dtype, transpose: bool):
    # Cached per device, so that steady-state calls (and CUDA-graph replays) copy nothing.
    m = _axis_matrix_np(n_in, n_out, sigma, truncate, border)
    return torch.from_numpy(m.T.copy() if transpose else m).to(device=device, dtype=dtype)


@functools.lru_cache(maxsize=256)
def _axis_bands(n_in, n_out, sigma, truncate, border, transpose: bool) -> torch.Tensor:
    """Each row's nonzero band of the CPU float32 matrix :func:`_axis_matrix` returns."""
    m = _axis_matrix(n_in, n_out, sigma, truncate, border, torch.device("cpu"), torch.float32, transpose)
    return native_kernels.row_bands(m)


# --------------------------------------------------------------------------------------------
# The op: sum_s R_s M_s C_s^T
# --------------------------------------------------------------------------------------------
def _upsample_blur_torch(maps, out_h, out_w, sigma, truncate, border):
    # sum_s R_s M_s C_s^T = [R_1 M_1 | ... | R_S M_S] @ [C_1^T; ...; C_S^T]: the layers' sum is the
    # inner dimension of one large matmul (batch folded into its rows), instead of S full-size
    # products and S - 1 additions of output-sized tensors.
    dev, dt = maps[0].device, maps[0].dtype
    left = torch.cat([torch.matmul(_axis_matrix(m.shape[1], out_h, sigma, truncate, border, dev, dt, False), m) for m in maps], 2)
    right = torch.cat([_axis_matrix(m.shape[2], out_w, sigma, truncate, border, dev, dt, True) for m in maps], 0)
    return torch.matmul(left, right)


@torch.library.custom_op("ckaad_fast::upsample_blur_sum", mutates_args=(), device_types=_DEVICES)
def _upsample_blur_op(
    maps: list[torch.Tensor], out_h: int, out_w: int, sigma: float, truncate: float, border: str
) -> torch.Tensor:
    if use_triton(maps[0]) and maps[0].dtype == torch.float32:
        dev = maps[0].device
        rows = [_axis_matrix(m.shape[1], out_h, sigma, truncate, border, dev, torch.float32, False) for m in maps]
        cols_t = [_axis_matrix(m.shape[2], out_w, sigma, truncate, border, dev, torch.float32, True) for m in maps]
        return upsample_blur_kernels.upsample_blur_sum(maps, rows, cols_t, out_h, out_w)
    if use_native(maps[0]) and len(maps) <= native_kernels.MAX_MAPS:
        # The same float32 matrices, multiplied over their bands only (~6x fewer multiply-adds).
        dev = maps[0].device
        args = [(_axis_matrix(m.shape[1], out_h, sigma, truncate, border, dev, torch.float32, False),
                 _axis_matrix(m.shape[2], out_w, sigma, truncate, border, dev, torch.float32, True),
                 _axis_bands(m.shape[1], out_h, sigma, truncate, border, False),
                 _axis_bands(m.shape[2], out_w, sigma, truncate, border, True)) for m in maps]
        rows, cols_t, row_bands, col_bands = (list(x) for x in zip(*args))
        return native_kernels.upsample_blur_sum([m.contiguous() for m in maps], rows, cols_t, row_bands, col_bands,
                                                out_h, out_w)
    # float64 (gradcheck) stays on the exact PyTorch path.
    return _upsample_blur_torch(maps, out_h, out_w, sigma, truncate, border)


@_upsample_blur_op.register_fake
def _(maps, out_h, out_w, sigma, truncate, border):
    return maps[0].new_empty((maps[0].shape[0], out_h, out_w))


@torch.library.custom_op("ckaad_fast::upsample_blur_sum_backward", mutates_args=(), device_types=_DEVICES)
def _upsample_blur_backward_op(
    grad: torch.Tensor, sizes: list[int], sigma: float, truncate: float, border: str
) -> list[torch.Tensor]:
    # The adjoint of R M C^T is R^T G C.
    out_h, out_w = grad.shape[1], grad.shape[2]
    grads = []
    for h, w in zip(sizes[0::2], sizes[1::2]):
        R = _axis_matrix(h, out_h, sigma, truncate, border, grad.device, grad.dtype, False)
        C = _axis_matrix(w, out_w, sigma, truncate, border, grad.device, grad.dtype, False)
        grads.append(torch.matmul(R.t(), torch.matmul(grad, C)))
    return grads


@_upsample_blur_backward_op.register_fake
def _(grad, sizes, sigma, truncate, border):
    return [grad.new_empty((grad.shape[0], h, w)) for h, w in zip(sizes[0::2], sizes[1::2])]


def _setup(ctx, inputs, output):
    maps, _, _, sigma, truncate, border = inputs
    ctx.sizes = [v for m in maps for v in (m.shape[1], m.shape[2])]
    ctx.args = (sigma, truncate, border)


def _backward(ctx, grad):
    if wants_double_backward():
        # R^T G C in plain matmuls: linear in G, so autograd differentiates it again.
        sigma, truncate, border = ctx.args
        out_h, out_w = grad.shape[1], grad.shape[2]
        grads = [torch.matmul(_axis_matrix(h, out_h, sigma, truncate, border, grad.device, grad.dtype, False).t(),
                              torch.matmul(grad, _axis_matrix(w, out_w, sigma, truncate, border, grad.device,
                                                              grad.dtype, False)))
                 for h, w in zip(ctx.sizes[0::2], ctx.sizes[1::2])]
        return grads, None, None, None, None, None
    grads = _upsample_blur_backward_op(grad.contiguous(), ctx.sizes, *ctx.args)
    return list(grads), None, None, None, None, None


_upsample_blur_op.register_autograd(_backward, setup_context=_setup)


def upsample_blur_sum(
    maps: Sequence[torch.Tensor], out_size=256, sigma: float = 4.0, truncate: float = 4.0, border: str = "reflect"
) -> torch.Tensor:
    """Bilinear upsampling (align_corners=True) of each (B, h_s, w_s) map to ``out_size``, summed
    over maps, then a Gaussian blur (scipy's gaussian_filter semantics, see :func:`anomaly_map`).

    Returns (B, out_h, out_w) in float32 (float64 for float64 maps). Differentiable.
    """
    maps = [maps] if isinstance(maps, torch.Tensor) else list(maps)
    if not maps:
        raise ValueError("maps is empty: pass one (B, h, w) map per layer")
    for i, m in enumerate(maps):
        check_float_tensor(m, f"maps[{i}]")
        if m.dim() != 3 or m.numel() == 0:
            raise ValueError(f"maps[{i}] must be a non-empty (B, h, w) tensor, got shape {tuple(m.shape)}")
    check_alike(maps, "maps")
    check_same_batch(maps, "maps")
    out_h, out_w = _out_size(out_size)
    sigma, truncate = _check_blur(sigma, truncate, border, out_h, out_w)
    dtype = torch.float64 if maps[0].dtype == torch.float64 else torch.float32
    maps = [m.to(dtype) for m in maps]
    return _upsample_blur_op(maps, out_h, out_w, float(sigma), float(truncate), border)


def _out_size(out_size) -> tuple[int, int]:
    out_h, out_w = out_size_pair(out_size)
    if max(out_h, out_w) > MAX_OUT_SIDE:
        raise ValueError(f"out_size must be at most {MAX_OUT_SIDE} per side (the blur matrices are dense), "
                         f"got {out_size!r}")
    return out_h, out_w


def _check_blur(sigma, truncate, border, out_h: int, out_w: int) -> tuple[float, float]:
    sigma = real_arg(sigma, "sigma")
    truncate = real_arg(truncate, "truncate", lo_open=True)
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS}, got {border!r}")
    taps = max(out_h, out_w) * (2 * int(truncate * sigma + 0.5) + 1)
    if sigma > 0 and taps > MAX_BLUR_TAPS:
        raise ValueError(f"sigma * truncate ({sigma:g} * {truncate:g}) is too large for a {out_h}x{out_w} map: "
                         f"the blur would need {taps} taps (at most {MAX_BLUR_TAPS})")
    return sigma, truncate


def _check_map_inputs(fs_list, ft_list, out_size, sigma, truncate, border):
    """The anomaly map's arguments checked (one rule for its fused and standard-operator forms)."""
    fs_list, ft_list = check_layer_lists(fs_list, ft_list, "fs_list", "ft_list")
    for i, (fs, ft) in enumerate(zip(fs_list, ft_list)):
        check_pair(fs, ft, f"fs_list[{i}]", f"ft_list[{i}]", ndim=4)
    check_alike(fs_list, "fs_list")
    check_same_batch(fs_list, "fs_list")
    out_h, out_w = _out_size(out_size)
    sigma, truncate = _check_blur(sigma, truncate, border, out_h, out_w)
    return fs_list, ft_list, out_h, out_w, sigma, truncate


def anomaly_map(
    fs_list: Sequence[torch.Tensor],
    ft_list: Sequence[torch.Tensor],
    out_size=256,
    sigma: float = 4.0,
    truncate: float = 4.0,
    border: str = "reflect",
) -> torch.Tensor:
    r"""The anomaly map of CKAAD's Eq. 14 (and RD4AD, RD++, ReContrast, anomalib's RD):

    .. math:: S = \mathrm{blur}_\sigma\Big(\sum_s \mathrm{up}\big(1 - \cos(F^s, \tilde F^s)\big)\Big)

    per layer the cosine error over channels, bilinear upsampling (align_corners=True) to
    ``out_size`` (an int or an (h, w) pair), the sum over layers, then a Gaussian blur with radius
    ``int(truncate * sigma + 0.5)``. ``border='reflect'`` is scipy's 'reflect' (edge pixel
    repeated: what CKAAD, RD4AD, RD++ and ReContrast compute with scipy on the CPU);
    ``border='mirror'`` is scipy's 'mirror', i.e. torch's F.pad 'reflect' (anomalib).
    ``sigma=0`` means no blur.

    ``fs_list``/``ft_list``: one (B, C_s, h_s, w_s) tensor per layer each. Returns (B, out_h, out_w)
    float32 (float64 for float64 features): the error maps are kept in float32 whatever the
    features' dtype.
    """
    fs_list, ft_list, out_h, out_w, sigma, truncate = _check_map_inputs(fs_list, ft_list, out_size, sigma, truncate,
                                                                       border)
    with nvtx_range("error map"):
        maps = [cosine_error_map_float32(fs, ft) for fs, ft in zip(fs_list, ft_list)]
    with nvtx_range("upsample+blur"):
        return _upsample_blur_op(maps, out_h, out_w, float(sigma), float(truncate), border)


def anomaly_map_standard_ops(
    fs_list: Sequence[torch.Tensor],
    ft_list: Sequence[torch.Tensor],
    out_size=256,
    sigma: float = 4.0,
    truncate: float = 4.0,
    border: str = "reflect",
    matrices: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """:func:`anomaly_map`'s own decomposition into standard operators, for exporters (ONNX,
    OpenVINO, AOTInductor) that cannot carry the fused custom op: the same arithmetic (per layer
    the cosine error with the same eps rule, accumulated in float32, then ``R @ E @ C^T`` with the
    same matrices, summed). Equal to :func:`anomaly_map` up to float32 rounding; not for training
    (its backward is autograd's, not the fused one).

    ``matrices``: each layer's ``(R, C^T)`` in float32 (:func:`upsample_blur_matrix`), e.g. a
    module's buffers, which is what a tracer (``torch.export``) needs; without them they are
    built on each call (never cached here, so that a traced call leaves no fake tensor behind)."""
    fs_list, ft_list, out_h, out_w, sigma, truncate = _check_map_inputs(fs_list, ft_list, out_size, sigma, truncate,
                                                                       border)
    total = None
    for i, (fs, ft) in enumerate(zip(fs_list, ft_list)):
        err = cosine_map_formula(fs, ft)  # the op's own formula, in float32 (float64 for float64)
        if matrices is not None:
            rows, cols_t = matrices[i]
        else:
            rows = torch.from_numpy(_axis_matrix_np(err.shape[1], out_h, sigma, truncate, border)).to(err.device, err.dtype)
            cols_t = torch.from_numpy(_axis_matrix_np(err.shape[2], out_w, sigma, truncate, border).T.copy()).to(
                err.device, err.dtype)
        up = torch.matmul(torch.matmul(rows, err), cols_t)
        total = up if total is None else total + up
    return total


def image_score(amap: torch.Tensor, topk: int | None) -> torch.Tensor:
    """Image-level score: the mean of the ``topk`` largest values of each map (``topk=1`` is the
    max; ``topk=None`` the mean of the whole map, the ISIC protocol).

    ``amap``: (B, H, W) or (B, 1, H, W). Returns (B,) float32 (float64 for float64 maps).
    """
    if not isinstance(amap, torch.Tensor):
        raise TypeError(f"amap must be a torch.Tensor, got {type(amap).__name__}")
    if not amap.is_floating_point():
        raise TypeError(f"amap must be a floating-point tensor, got {amap.dtype}")
    if amap.dim() not in (3, 4) or (amap.dim() == 4 and amap.shape[1] != 1) or amap.numel() == 0:
        raise ValueError(f"amap must be (B, H, W) or (B, 1, H, W), not empty, got shape {tuple(amap.shape)}")
    flat = amap.reshape(amap.shape[0], -1)
    if flat.dtype != torch.float64:
        flat = flat.float()
    with nvtx_range("top-k"):
        if topk is None:
            return flat.mean(1)
        if not is_index_like(topk) or not 1 <= operator.index(topk) <= flat.shape[1]:
            raise ValueError(f"topk must be an int in [1, H*W = {flat.shape[1]}] or None, got {topk!r}")
        k = operator.index(topk)
        if flat.shape[1] > TOPK_CHUNK and k <= TOPK_CHUNK // 4:
            # Top-k of the chunks' top-k: the same k values. torch.topk of one huge row takes a
            # workspace of 16 bytes a value (2.2 GB for a 144-megapixel map, measured).
            b, n = flat.shape
            whole = n - n % TOPK_CHUNK
            chunks = flat[:, :whole].reshape(b, -1, TOPK_CHUNK)  # a view: no copy of the map
            parts = [torch.topk(chunks, k, dim=2, sorted=False).values.reshape(b, -1)]
            if whole < n:
                parts.append(torch.topk(flat[:, whole:], min(k, n - whole), dim=1, sorted=False).values)
            flat = torch.cat(parts, 1)
        return torch.topk(flat, k, dim=1, sorted=False).values.mean(1)
