"""Cosine error maps and the cosine reconstruction loss, as differentiable torch ops.

Each op is a ``torch.library.custom_op`` with a CPU and a CUDA implementation, a fake
implementation (so ``torch.compile(fullgraph=True)`` traces through it) and an autograd formula
whose backward is itself an op. The CUDA implementation runs the Triton kernels; the CPU one runs
a vectorised PyTorch path, or the kernels under Triton's interpreter (see ``_backend``).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..kernels.dtypes import acc_dtype
from ..kernels import native as native_kernels
from ._backend import cosine_kernels, eager_cpu_path, use_native, use_triton
from ._buffers import reusable_empty
from ._double import grads_by_autograd, safe_norm, wants_double_backward
from .checks import check_alike, check_layer_lists, check_pair, real_arg
from ._layout import rows_in_memory_order

_DEVICES = ("cpu", "cuda")


# --------------------------------------------------------------------------------------------
# Per-position error map: 1 - cos(a[:, :, h, w], b[:, :, h, w])
# --------------------------------------------------------------------------------------------
def _channel_sums(a: torch.Tensor, b: torch.Tensor, cdim: int) -> torch.Tensor:
    """(a.b, |a|^2, |b|^2) reduced over dim ``cdim``, stacked in a new leading dim of 3.

    The CPU path of both cosine ops: one sweep over slabs along ``cdim``, whose products are
    accumulated element-wise (addcmul) into three cache-sized accumulators, reduced over the slab
    once at the end. The inputs are read once, and no temporary as large as the features is made
    (their page faults cost more than the arithmetic). Measured on 2 cores at WideResNet50's
    shapes: 0.9 ms per image, against 1.3 ms for slab-wise mul + sum and 2.4 ms for whole-tensor
    products. The loop runs over slabs, never over images.
    """
    acc = acc_dtype(a.dtype)
    C = a.shape[cdim]
    rest = a.numel() // max(1, C)
    step = max(1, min(C, _SLAB_ELEMENTS // max(1, rest)))
    shape = list(a.shape)
    shape[cdim] = step
    accs = a.new_zeros((3, *shape), dtype=acc)
    for c0 in range(0, C, step):
        k = min(step, C - c0)
        x = a.narrow(cdim, c0, k).to(acc)
        y = b.narrow(cdim, c0, k).to(acc)
        accs[0].narrow(cdim, 0, k).addcmul_(x, y)
        accs[1].narrow(cdim, 0, k).addcmul_(x, x)
        accs[2].narrow(cdim, 0, k).addcmul_(y, y)
    return accs.sum(cdim + 1)


# Elements per accumulator (x3, float32): ~3 MB, which stays in the last-level cache.
_SLAB_ELEMENTS = 262144


def _row_norms_and_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(a.b, |a|, |b|) over channels of channels_last tensors, stacked in a new leading dim of 3.

    Each position's channels are one contiguous row: two row norms and a batched row dot product
    (bmm of (P, 1, C) by (P, C, 1)) read each row where it lies. Slabs along the channels (the
    NCHW path) would read a few floats of every cache line: measured at 16x256x64x64 on a 2-core
    EPYC, 0.8 ms per image against 6.8 ms."""
    N, C, H, W = a.shape
    acc = acc_dtype(a.dtype)
    x, y = a.permute(0, 2, 3, 1).reshape(-1, C), b.permute(0, 2, 3, 1).reshape(-1, C)
    if x.dtype != acc:  # float32 products of bfloat16/float16 rows
        x, y = x.to(acc), y.to(acc)
    dots = torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(N, H, W)
    return torch.stack([dots, torch.linalg.vector_norm(x, dim=1).view(N, H, W),
                        torch.linalg.vector_norm(y, dim=1).view(N, H, W)])


def _cosine_map_torch(a: torch.Tensor, b: torch.Tensor, eps: float, out_dtype: torch.dtype):
    N, C, H, W = a.shape
    if a.stride(1) == 1 and C > 1:
        sums = _row_norms_and_dots(a, b)  # channels_last
        na, nb = sums[1], sums[2]
    else:
        sums = _channel_sums(a, b, 1)
        na, nb = sums[1].sqrt_(), sums[2].sqrt_()
    cos = sums[0].div_(na.clamp_min(eps) * nb.clamp_min(eps))
    return (1 - cos).to(out_dtype), sums  # sums now holds (cos, |a|, |b|)


def _cosine_map_backward_torch(a, b, grad_err, stats, eps: float):
    acc = stats.dtype
    cos, na, nb = stats[0], stats[1], stats[2]
    g = grad_err.to(acc)
    na_c, nb_c = na.clamp_min(eps), nb.clamp_min(eps)
    k_ab = (-g / (na_c * nb_c)).unsqueeze(1)
    k_aa = torch.where(na > eps, g * cos / (na_c * na_c), 0).unsqueeze(1)
    k_bb = torch.where(nb > eps, g * cos / (nb_c * nb_c), 0).unsqueeze(1)
    x, y = a.to(acc), b.to(acc)
    # empty_like keeps the inputs' layout, as the Triton path does.
    grad_a = torch.empty_like(a).copy_(k_ab * y + k_aa * x)
    grad_b = torch.empty_like(b).copy_(k_ab * x + k_bb * y)
    return grad_a, grad_b


@torch.library.custom_op("ckaad_fast::cosine_error_map", mutates_args=(), device_types=_DEVICES)
def _cosine_map_op(a: torch.Tensor, b: torch.Tensor, eps: float, float32_out: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out_dtype = acc_dtype(a.dtype) if float32_out else a.dtype
    if use_triton(a):
        return cosine_kernels.cosine_map_forward(a, b, eps, out_dtype)
    if use_native(a) and native_kernels.cosine_layout(a, b):
        # One pass over both inputs in place (NCHW or channels_last): 1.1x the read-once time
        # where the ATen paths take 3.6x (docs/BENCHMARKS.md).
        return native_kernels.cosine_map(a, b, eps)
    return _cosine_map_torch(a, b, eps, out_dtype)


@_cosine_map_op.register_fake
def _(a, b, eps, float32_out):
    N, C, H, W = a.shape
    out_dtype = acc_dtype(a.dtype) if float32_out else a.dtype
    return a.new_empty((N, H, W), dtype=out_dtype), a.new_empty((3, N, H, W), dtype=acc_dtype(a.dtype))


@torch.library.custom_op("ckaad_fast::cosine_error_map_backward", mutates_args=(), device_types=_DEVICES)
def _cosine_map_backward_op(
    a: torch.Tensor, b: torch.Tensor, grad_err: torch.Tensor, stats: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton(a):
        return cosine_kernels.cosine_map_backward(a, b, grad_err, stats, eps)
    return _cosine_map_backward_torch(a, b, grad_err, stats, eps)


@_cosine_map_backward_op.register_fake
def _(a, b, grad_err, stats, eps):
    return torch.empty_like(a), torch.empty_like(b)


def _cosine_map_setup(ctx, inputs, output):
    a, b, eps, _ = inputs
    ctx.save_for_backward(a, b, output[1])
    ctx.eps = eps


def cosine_map_formula(a, b, eps: float = 1e-8):
    """The error map in plain, twice-differentiable PyTorch (accumulated in float32 or float64):
    what double backward differentiates and what exporters carry instead of the fused op."""
    acc = acc_dtype(a.dtype)
    x, y = a.to(acc), b.to(acc)
    return 1 - (x * y).sum(1) / (safe_norm((x * x).sum(1), eps) * safe_norm((y * y).sum(1), eps))


def _cosine_map_backward(ctx, grad_err, _grad_stats):
    a, b, stats = ctx.saved_tensors
    if grad_err is None:
        return None, None, None, None
    if wants_double_backward():
        eps = ctx.eps
        ga, gb = grads_by_autograd(lambda x, y: cosine_map_formula(x, y, eps), (a, b), ctx.needs_input_grad[:2],
                                   grad_err)
        return ga, gb, None, None
    grad_a, grad_b = _cosine_map_backward_op(a, b, grad_err, stats, ctx.eps)
    return grad_a, grad_b, None, None


_cosine_map_op.register_autograd(_cosine_map_backward, setup_context=_cosine_map_setup)


def cosine_error_map(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    r"""Per-position cosine error over channels.

    .. math:: E[n, h, w] = 1 - \frac{\sum_c a_{nchw} b_{nchw}}{\max(\|a_{n:hw}\|, \epsilon)\,\max(\|b_{n:hw}\|, \epsilon)}

    Equal to ``1 - F.cosine_similarity(a, b, dim=1, eps=eps)``, computed in one pass over both
    inputs (accumulating in float32), differentiable in both. ``a`` and ``b``: (B, C, H, W) of
    float32, float16 or bfloat16 (float64 too, for gradcheck), any layout. Returns (B, H, W) in the
    inputs' dtype.
    """
    check_pair(a, b, "a", "b", ndim=4)
    return _cosine_map_op(a, b, real_arg(eps, "eps"), False)[0]


def cosine_error_map_float32(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """:func:`cosine_error_map` returned in float32 whatever the input dtype (for scoring)."""
    check_pair(a, b, "a", "b", ndim=4)
    return _cosine_map_op(a, b, real_arg(eps, "eps"), True)[0]


# --------------------------------------------------------------------------------------------
# Flattened cosine loss: mean over the batch of 1 - cos(flatten(out_i), flatten(in_i))
# --------------------------------------------------------------------------------------------
def _flat_sums_torch(a2d: torch.Tensor, b2d: torch.Tensor) -> torch.Tensor:
    """Per-row (a.b, |a|^2, |b|^2) of two (rows, N) matrices -> (rows, 3), reading each once.

    Each row is cut into chunks that fit the L2 cache together; a chunk's three dot products
    (BLAS) read it from memory once and twice more from cache, with no temporary. Measured on 2
    cores at WideResNet50's shapes, batch 16: 12.0 ms against 21.5 ms for the element-wise
    accumulators of :func:`_channel_sums` and 10.3 ms for reading both once (``sum``). Rows
    shorter than a chunk take three reductions over the whole matrix instead, whose op count does
    not grow with the rows."""
    acc = acc_dtype(a2d.dtype)
    rows, n = a2d.shape
    if n < _DOT_CHUNK:
        # Short rows: three whole-matrix reductions along the contiguous rows beat per-row dots
        # (measured at (8, 32768): 51 us against 131 us for the dots and 231 us for accumulators).
        x, y = (a2d, b2d) if a2d.dtype == acc else (a2d.to(acc), b2d.to(acc))
        return torch.stack([(x * y).sum(1), torch.linalg.vector_norm(x, dim=1).square(),
                            torch.linalg.vector_norm(y, dim=1).square()], 1)
    parts = []
    for r in range(rows):
        xr, yr = a2d[r], b2d[r]
        for c0 in range(0, n, _DOT_CHUNK):
            x, y = xr[c0:c0 + _DOT_CHUNK], yr[c0:c0 + _DOT_CHUNK]
            if x.dtype != acc:
                x, y = x.to(acc), y.to(acc)
            parts += (torch.dot(x, y), torch.dot(x, x), torch.dot(y, y))
    return torch.stack(parts).view(rows, -1, 3).sum(1)


# Elements per chunk of a row (512 KB per operand in float32: both fit a 2 MB L2 with room).
_DOT_CHUNK = 131072


def _flat_cos_from_sums(sums: torch.Tensor, eps: float):
    na, nb = sums[:, 1].sqrt(), sums[:, 2].sqrt()
    cos = sums[:, 0] / (na.clamp_min(eps) * nb.clamp_min(eps))
    return cos, na, nb


# One op takes every layer, so that the loss costs one dispatch whatever the number of layers.
@torch.library.custom_op("ckaad_fast::flat_cosine_loss", mutates_args=(), device_types=_DEVICES)
def _flat_cosine_loss_op(a: list[torch.Tensor], b: list[torch.Tensor], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over layers of mean_i (1 - cos(flatten(a_i), flatten(b_i))), and the per-sample sums
    (a.b, |a|^2, |b|^2) of every layer stacked along dim 0, for the backward."""
    return _flat_loss_impl(a, b, eps)


def _flat_loss_impl(a, b, eps: float):
    all_sums = []
    for x, y in zip(a, b):
        x2d, y2d, _ = rows_in_memory_order(x, y)
        if use_triton(x):
            all_sums.append(cosine_kernels.flat_cosine_sums(x2d, y2d))
        elif use_native(x):
            all_sums.append(native_kernels.flat_sums(x2d, y2d))
        else:
            all_sums.append(_flat_sums_torch(x2d, y2d))
    sums = torch.cat(all_sums) if len(all_sums) > 1 else all_sums[0]
    # Every layer's rows at once: sum_l mean_i (1 - cos_li) = sum_rows (1 - cos_row) / B_layer.
    cos, _, _ = _flat_cos_from_sums(sums, eps)
    if len(a) == 1:
        return (1 - cos).mean(), sums
    weights = torch.cat([sums.new_full((x.shape[0],), 1.0 / x.shape[0]) for x in a])
    return torch.dot(1 - cos, weights), sums


@_flat_cosine_loss_op.register_fake
def _(a, b, eps):
    acc = acc_dtype(a[0].dtype)
    return a[0].new_empty((), dtype=acc), a[0].new_empty((sum(x.shape[0] for x in a), 3), dtype=acc)


def _flat_coefficients(grad, sums, eps, batch_sizes):
    """(rows, 3) per-sample coefficients of every layer: grad_x = k_xy y + k_xx x and grad_y =
    k_xy x + k_yy y, for all layers' rows at once."""
    cos, na, nb = _flat_cos_from_sums(sums, eps)
    na_c, nb_c = na.clamp_min(eps), nb.clamp_min(eps)
    g = grad.to(sums.dtype)
    if len(set(batch_sizes)) == 1:
        g = g / batch_sizes[0]
    else:
        g = g * torch.cat([sums.new_full((b,), 1.0 / b) for b in batch_sizes])
    return torch.stack(
        [
            -g / (na_c * nb_c),
            torch.where(na > eps, g * cos / (na_c * na_c), 0),
            torch.where(nb > eps, g * cos / (nb_c * nb_c), 0),
        ],
        dim=1,
    )


def _flat_grads(x, y, coef, need_x: bool, need_y: bool):
    x2d, y2d, restore = rows_in_memory_order(x, y)
    acc = coef.dtype

    def out():  # float32/64 gradients go to a reused buffer: fresh pages cost more than the math
        # (not while autograd records, as under create_graph=True: out= has no derivative)
        reuse = x2d.dtype == acc and not torch.is_grad_enabled()
        return reusable_empty(x2d.shape, acc, x2d.device) if reuse else None

    if use_triton(x):
        gx2d, gy2d = cosine_kernels.flat_cosine_backward(x2d, y2d, coef, need_a=need_x, need_b=need_y)
    elif use_native(x):  # one read of both, one write of each gradient
        gx2d, gy2d = native_kernels.flat_grads(x2d, y2d, coef, need_x, need_y, out() if need_x else None,
                                               out() if need_y else None)
    else:
        xa, ya = x2d.to(acc), y2d.to(acc)
        gx2d = torch.mul(xa, coef[:, 1:2], out=out()).addcmul_(ya, coef[:, 0:1]).to(x.dtype) if need_x else None
        gy2d = torch.mul(ya, coef[:, 2:3], out=out()).addcmul_(xa, coef[:, 0:1]).to(y.dtype) if need_y else None
    # A gradient nobody needs comes back empty (custom ops cannot return None in a list).
    gx = restore(gx2d) if need_x else x.new_empty(0)
    gy = restore(gy2d) if need_y else y.new_empty(0)
    return gx, gy


@torch.library.custom_op("ckaad_fast::flat_cosine_loss_backward", mutates_args=(), device_types=_DEVICES)
def _flat_cosine_loss_backward_op(
    a: list[torch.Tensor], b: list[torch.Tensor], grad: torch.Tensor, sums: torch.Tensor, eps: float,
    need_a: bool, need_b: bool,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    return _flat_backward_impl(a, b, grad, sums, eps, need_a, need_b)


def _flat_backward_impl(a, b, grad, sums, eps: float, need_a: bool, need_b: bool):
    grads_a, grads_b, row = [], [], 0
    coef = _flat_coefficients(grad, sums, eps, [x.shape[0] for x in a])
    for x, y in zip(a, b):
        gx, gy = _flat_grads(x, y, coef[row:row + x.shape[0]], need_a, need_b)
        grads_a.append(gx)
        grads_b.append(gy)
        row += x.shape[0]
    return grads_a, grads_b


@_flat_cosine_loss_backward_op.register_fake
def _(a, b, grad, sums, eps, need_a, need_b):
    return ([torch.empty_like(x) if need_a else x.new_empty(0) for x in a],
            [torch.empty_like(y) if need_b else y.new_empty(0) for y in b])


def _flat_setup(ctx, inputs, output):
    a, b, eps = inputs
    ctx.n_layers = len(a)
    ctx.save_for_backward(*a, *b, output[1])
    ctx.eps = eps


def _flat_loss_formula(a, b, eps: float):
    """The loss in plain, twice-differentiable PyTorch (accumulated in float32 or float64)."""
    total = None
    for x, y in zip(a, b):
        acc = acc_dtype(x.dtype)
        x2, y2 = x.reshape(x.shape[0], -1).to(acc), y.reshape(y.shape[0], -1).to(acc)
        cos = (x2 * y2).sum(1) / (safe_norm((x2 * x2).sum(1), eps) * safe_norm((y2 * y2).sum(1), eps))
        term = (1 - cos).mean()
        total = term if total is None else total + term
    return total


def _flat_grads_by_autograd(tensors, n: int, needs, grad, eps: float):
    """(grads of the first n tensors, grads of the rest), twice differentiable."""
    got = grads_by_autograd(lambda *t: _flat_loss_formula(t[:n], t[n:], eps), tensors, needs, grad)
    return got[:n], got[n:]


def _flat_backward(ctx, grad, _grad_sums):
    saved = ctx.saved_tensors
    n = ctx.n_layers
    # For a list argument, needs_input_grad holds one flag per tensor.
    need_a, need_b = any(ctx.needs_input_grad[0]), any(ctx.needs_input_grad[1])
    if grad is None or not (need_a or need_b):
        return [None] * n, [None] * n, None
    if wants_double_backward():
        needs = [*ctx.needs_input_grad[0], *ctx.needs_input_grad[1]]
        ga, gb = _flat_grads_by_autograd(saved[:2 * n], n, needs, grad, ctx.eps)
        return ga, gb, None
    grads_a, grads_b = _flat_cosine_loss_backward_op(
        list(saved[:n]), list(saved[n:2 * n]), grad, saved[-1], ctx.eps, need_a, need_b
    )
    return (list(grads_a) if need_a else [None] * n), (list(grads_b) if need_b else [None] * n), None


_flat_cosine_loss_op.register_autograd(_flat_backward, setup_context=_flat_setup)


class _EagerFlatCosine(torch.autograd.Function):
    """The loss op and its backward for CPU tensors in eager mode, without the ``custom_op``
    wrapper (see :func:`._backend.eager_cpu_path`): the same implementation, called directly."""

    @staticmethod
    def forward(ctx, eps: float, n: int, *tensors: torch.Tensor) -> torch.Tensor:
        a, b = list(tensors[:n]), list(tensors[n:])
        total, sums = _flat_loss_impl(a, b, eps)
        ctx.save_for_backward(*tensors, sums)
        ctx.eps, ctx.n = eps, n
        return total

    @staticmethod
    def backward(ctx, grad):
        *tensors, sums = ctx.saved_tensors
        n = ctx.n
        need_a, need_b = any(ctx.needs_input_grad[2:2 + n]), any(ctx.needs_input_grad[2 + n:])
        if not (need_a or need_b):
            return (None,) * (2 + 2 * n)
        if wants_double_backward():
            ga, gb = _flat_grads_by_autograd(tensors, n, ctx.needs_input_grad[2:], grad, ctx.eps)
            return (None, None, *ga, *gb)
        ga, gb = _flat_backward_impl(tensors[:n], tensors[n:], grad, sums, ctx.eps, need_a, need_b)
        return (None, None, *(ga if need_a else [None] * n), *(gb if need_b else [None] * n))


def cosine_reconstruction_loss(
    inputs: Sequence[torch.Tensor] | torch.Tensor, outputs: Sequence[torch.Tensor] | torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    r"""Eq. 2 of CKAAD (and RD4AD's loss): for each layer, the batch mean of 1 - cos between the
    flattened (C·H·W) input and output maps, summed over layers.

    .. math:: L = \sum_s \frac{1}{B} \sum_i \left(1 - \cos(\mathrm{flat}(\tilde F^s_i), \mathrm{flat}(F^s_i))\right)

    ``inputs`` and ``outputs``: one tensor per layer (or a single tensor), (B, ...) each, any
    float dtype and layout. Forward and backward are one fused pass over the features each.
    Returns a 0-d float32 tensor (float64 for float64 inputs).
    """
    inputs, outputs = check_layer_lists(inputs, outputs, "inputs", "outputs")
    for i, (x, y) in enumerate(zip(inputs, outputs)):
        check_pair(x, y, f"inputs[{i}]", f"outputs[{i}]")
    check_alike(inputs, "inputs")
    eps = real_arg(eps, "eps")
    if eager_cpu_path([*outputs, *inputs]):
        return _EagerFlatCosine.apply(eps, len(outputs), *outputs, *inputs)
    return _flat_cosine_loss_op(list(outputs), list(inputs), eps)[0]
