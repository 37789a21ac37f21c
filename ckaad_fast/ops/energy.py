"""Hinge energy losses of CKAAD's energy-based discriminators (Eq. 8/9/11/12).

The energy of a patch is |s|, the absolute raw score of the discriminator. Normal features should
get low energy (the loss is mean |s|), generated and anomalous ones at least the margin (the loss
is mean max(0, margin - |s|)). A whole loss is one op whose forward and backward make one fused
pass over each score tensor.
"""
from __future__ import annotations

import itertools
from typing import Sequence

import torch

from ..kernels import native as native_kernels
from ..kernels.dtypes import acc_dtype
from ._backend import eager_cpu_path, energy_kernels, use_native, use_triton
from ._double import grads_by_autograd, wants_double_backward
from .checks import check_float_tensor, real_arg
from ._layout import flat_in_memory_order

_DEVICES = ("cpu", "cuda")


def _energy_sum(s: torch.Tensor, margin: float, high: bool, triton: bool) -> torch.Tensor:
    if triton:
        flat, _ = flat_in_memory_order(s)  # the kernel reads a flat buffer, in memory order
        return energy_kernels.energy_sum(flat, margin, high)
    acc = acc_dtype(s.dtype)
    # .to() even as a no-op costs a dispatch: at score-map sizes these calls are the cost.
    e = (s if s.dtype == acc else s.to(acc)).abs()
    return torch.relu(margin - e).sum() if high else e.sum()


def _energy_grad(s: torch.Tensor, scale: torch.Tensor, margin: float, high: bool, triton: bool) -> torch.Tensor:
    if triton:
        flat, restore = flat_in_memory_order(s)
        return restore(energy_kernels.energy_backward(flat, scale, margin, high))
    # Element-wise ops keep s's shape and layout, so the torch path needs no flattening.
    x = s if s.dtype == scale.dtype else s.to(scale.dtype)
    g = torch.sign(x)  # 0 at 0 and at NaN, as autograd's abs backward gives
    if high:
        # relu's backward passes the gradient where margin - |s| > 0 (never at NaN).
        g = g.mul_(x.abs() < margin).neg_()
    g = g.mul_(scale)
    return g if g.dtype == s.dtype else g.to(s.dtype)


# One op takes every term of a loss (all layers, all three kinds of scores), so that a
# discriminator loss costs one dispatch instead of three per layer: the op call, not the
# arithmetic, dominates at the score maps' small sizes.
@torch.library.custom_op("ckaad_fast::energy_loss", mutates_args=(), device_types=_DEVICES)
def _energy_op(scores: list[torch.Tensor], weights: list[float], high: list[bool], margin: float) -> torch.Tensor:
    if use_native(scores[0]):
        total, _ = native_kernels.energy(_dense(scores), _slopes(scores, weights), high, margin, want_grads=False)
        return scores[0].new_tensor(total)
    total = None
    triton = use_triton(scores[0])  # one backend for every term: the checks made them share a device
    for s, w, h in zip(scores, weights, high):
        term = _energy_sum(s, margin, h, triton) * (w / s.numel())
        total = term if total is None else total + term
    return total


@_energy_op.register_fake
def _(scores, weights, high, margin):
    return scores[0].new_empty((), dtype=acc_dtype(scores[0].dtype))


@torch.library.custom_op("ckaad_fast::energy_loss_backward", mutates_args=(), device_types=_DEVICES)
def _energy_backward_op(
    scores: list[torch.Tensor], grad: torch.Tensor, weights: list[float], high: list[bool], margin: float
) -> list[torch.Tensor]:
    if use_native(scores[0]):
        got = native_kernels.energy_grad(_dense(scores), _slopes(scores, weights), high, margin, grad.item())
        return _in_layout(got, scores)
    grads = []
    triton = use_triton(scores[0])
    for s, w, h in zip(scores, weights, high):
        scale = grad.to(acc_dtype(s.dtype)) * (w / s.numel())
        grads.append(_energy_grad(s, scale, margin, h, triton))
    return grads


@_energy_backward_op.register_fake
def _(scores, grad, weights, high, margin):
    return [torch.empty_like(s) for s in scores]


def _dense(scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """The scores as the native kernels read them: contiguous (a copy only where they are not)."""
    return [s if s.is_contiguous() else s.contiguous() for s in scores]


def _in_layout(grads: list[torch.Tensor], scores: list[torch.Tensor]) -> list[torch.Tensor]:
    """Gradients of contiguous copies given back in each score tensor's own layout."""
    return [g if s.is_contiguous() else torch.empty_like(s).copy_(g) for g, s in zip(grads, scores)]


def _slopes(scores, weights) -> list[float]:
    """Each term's weight per element: the mean's 1/numel folded in."""
    return [w / s.numel() for s, w in zip(scores, weights)]


def _setup(ctx, inputs, output):
    scores, weights, high, margin = inputs
    ctx.save_for_backward(*scores)
    ctx.args = (weights, high, margin)


def _energy_formula(scores, weights, high, margin: float):
    """The loss in plain, twice-differentiable PyTorch."""
    total = None
    for s, w, h in zip(scores, weights, high):
        e = s.to(acc_dtype(s.dtype)).abs()
        term = (torch.relu(margin - e) if h else e).mean() * w
        total = term if total is None else total + term
    return total


def _backward(ctx, grad):
    if wants_double_backward():
        weights, high, margin = ctx.args
        grads = grads_by_autograd(lambda *s: _energy_formula(s, weights, high, margin), ctx.saved_tensors,
                                  ctx.needs_input_grad[0], grad)
        return grads, None, None, None
    grads = _energy_backward_op(list(ctx.saved_tensors), grad, *ctx.args)
    return list(grads), None, None, None


_energy_op.register_autograd(_backward, setup_context=_setup)


# --------------------------------------------------------------------------------------------
# The eager CPU path: the same loss as one autograd.Function over one flat buffer of all terms
# --------------------------------------------------------------------------------------------
# Why one buffer: at the score maps' sizes (tens of thousands of values per term, up to nine
# terms) each PyTorch call costs more in dispatch than in arithmetic, and the compiled plain
# formula (Inductor's one C++ loop) beat the former per-term path 2x (0.42x, 2-core EPYC,
# bench_ops). It still does (0.35-0.66x; docs/BENCHMARKS.md says why). Copying every term into one buffer (one cat) makes each later step a single call:
# forward one abs, one clamp of the high terms and one dot product with a per-element weight;
# backward one sign, the high terms' mask, and the weights and upstream gradient applied in place.
#
# The high terms use max(0, m - |s|) = m - min(|s|, m): their values are clamped at m and weighed
# -w_i / numel_i, and the loss adds sum_i w_i m. Plan cache: (numels, weights, high, margin,
# dtype) -> the terms' order (low ones first), their sizes, their weights, the number of low
# values, the offset and each element's weight. A buffer over _PLAN_ELEMENTS values gets no
# per-element weight (it would cost as much memory as the scores) and is weighed per term.
_PLANS: dict[tuple, tuple] = {}
_MAX_PLANS = 32
_PLAN_ELEMENTS = 1 << 22


def _plan(scores: list[torch.Tensor], weights: list[float], high: list[bool], margin: float, acc: torch.dtype):
    key = (tuple(s.numel() for s in scores), tuple(weights), tuple(high), margin, acc)
    plan = _PLANS.get(key)
    if plan is None:
        order = [i for i, h in enumerate(high) if not h] + [i for i, h in enumerate(high) if h]
        numels = tuple(scores[i].numel() for i in order)
        slopes = [(-weights[i] if high[i] else weights[i]) / scores[i].numel() for i in order]
        n_low = sum(scores[i].numel() for i in order if not high[i])
        offset = float(sum(w * margin for w, h in zip(weights, high) if h))
        small = sum(numels) <= _PLAN_ELEMENTS
        per_element = torch.cat([torch.full((n,), a, dtype=acc) for n, a in zip(numels, slopes)]) if small else None
        plan = (tuple(order), numels, torch.tensor(slopes, dtype=acc), n_low, offset, per_element)
        if small:
            if len(_PLANS) >= _MAX_PLANS:
                _PLANS.pop(next(iter(_PLANS)))
            _PLANS[key] = plan
    return plan


class _EagerEnergy(torch.autograd.Function):
    """:func:`_energy_op` and its backward for CPU tensors in eager mode, over one flat copy of
    all terms (see above). No ``custom_op`` wrapper runs (see :func:`._backend.eager_cpu_path`);
    the values and gradients are the op's."""

    @staticmethod
    def forward(ctx, margin: float, plan, *scores: torch.Tensor):
        order, numels, slopes, n_low, offset, per_element = plan
        flat = torch.cat([scores[i].reshape(-1) for i in order]) if len(order) > 1 else scores[0].reshape(-1)
        if flat.dtype != slopes.dtype:
            flat = flat.to(slopes.dtype)
        values = flat.abs()
        values[n_low:].clamp_max_(margin)  # min(|s|, m), NaN kept
        if per_element is not None:
            total = torch.dot(values, per_element)
        else:
            total = torch.dot(torch.stack([v.sum() for v in values.split(numels)]), slopes)
        # The scores themselves too (not only their flat copy), so that a double backward reaches them.
        ctx.save_for_backward(flat, *scores)
        ctx.margin, ctx.plan = margin, plan
        return total + offset if offset else total

    @staticmethod
    def backward(ctx, upstream):
        flat, *scores = ctx.saved_tensors
        order, numels, slopes, n_low, _, per_element = ctx.plan
        m = ctx.margin
        grads = [None] * len(scores)
        if wants_double_backward():
            weights = [abs(a) * n for a, n in zip(slopes.tolist(), numels)]
            high = [k >= n_low for k in itertools.accumulate((0, *numels[:-1]))]  # each term's offset
            got = grads_by_autograd(lambda *s: _energy_formula(s, weights, high, m), [scores[i] for i in order],
                                    [ctx.needs_input_grad[2 + i] for i in order], upstream)
            for i, g in zip(order, got):
                grads[i] = g
            return (None, None, *grads)
        g = torch.sign(flat)  # d|s|/ds = sign(s): 0 at 0 and at NaN, as autograd's abs backward
        if n_low < g.numel():  # d min(|s|, m)/ds passes only where |s| < m (hardtanh's backward)
            g[n_low:] = torch.ops.aten.hardtanh_backward(g[n_low:], flat[n_low:], -m, m)
        if per_element is not None:
            g.mul_(per_element)
        else:
            for part, a in zip(g.split(numels), slopes.tolist()):
                part.mul_(a)
        g.mul_(upstream)
        for i, part in zip(order, g.split(numels)):
            s = scores[i]
            part = part.view(s.shape)
            if not s.is_contiguous():  # the gradient in the scores' own layout, as the op gives
                part = torch.empty_like(s, dtype=part.dtype).copy_(part)
            grads[i] = part if part.dtype == s.dtype else part.to(s.dtype)
        return (None, None, *grads)


class _NativeEnergy(torch.autograd.Function):
    """:func:`_energy_op` and its backward for float32 CPU tensors in eager mode, on the native
    kernels: the forward's one pass over each term also writes its gradient (the backward of a
    hinge is a sign and a mask, known as soon as the scores are read), so the backward only
    scales it by the upstream gradient, in place, or hands it over as it is when that is 1.
    Measured at three layers of 16x1x64^2..16^2 score maps, nine terms, on a 2-core EPYC: 0.29-0.32
    ms forward + backward, against 0.40-0.44 ms for the plain formula under torch.compile
    (bench_ops, two runs; docs/BENCHMARKS.md)."""

    @staticmethod
    def forward(ctx, margin: float, weights, high, *scores: torch.Tensor):
        want = any(ctx.needs_input_grad[3:])
        total, grads = native_kernels.energy(_dense(scores), _slopes(scores, weights), high, margin, want_grads=want)
        ctx.save_for_backward(*scores)
        ctx.args = (weights, high, margin)
        # Handed to the first backward only: a second one (retain_graph=True) recomputes them.
        ctx.grads = _in_layout(grads, scores) if want else None
        return scores[0].new_tensor(total)

    @staticmethod
    def backward(ctx, upstream):
        scores = ctx.saved_tensors  # also autograd's check that nobody changed them in place
        weights, high, margin = ctx.args
        if wants_double_backward():
            got = grads_by_autograd(lambda *s: _energy_formula(s, weights, high, margin), scores,
                                    ctx.needs_input_grad[3:], upstream)
            return (None, None, None, *got)
        grads, ctx.grads = ctx.grads, None
        scale = upstream.item()
        if grads is None:
            grads = list(_energy_backward_op(list(scores), upstream, weights, high, margin))
        elif scale != 1.0:
            for g in grads:
                g.mul_(scale)  # ours alone: nothing else holds them yet
        return (None, None, None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[3:])))


def _energy(scores: list[torch.Tensor], weights: list[float], high: list[bool], margin: float) -> torch.Tensor:
    """The loss through an eager CPU Function where one may run, else the registered op."""
    if eager_cpu_path(scores):
        if use_native(scores[0]):
            return _NativeEnergy.apply(margin, weights, high, *scores)
        return _EagerEnergy.apply(margin, _plan(scores, weights, high, margin, acc_dtype(scores[0].dtype)), *scores)
    return _energy_op(scores, weights, high, margin)


def _check_scores(groups: dict[str, list]) -> list:
    """Check each layer's score tensor, naming it; return them all, in order, as one list."""
    scores = []
    for name, layers in groups.items():
        for i, s in enumerate(layers):
            check_float_tensor(s, f"{name}[{i}]")
            if s.numel() == 0:
                raise ValueError(f"{name}[{i}] is empty (shape {tuple(s.shape)}): the mean is undefined")
            scores.append(s)
    if len({s.dtype for s in scores}) > 1 or len({s.device for s in scores}) > 1:
        found = sorted({f"{s.dtype} on {s.device}" for s in scores})
        raise ValueError(f"the score tensors of {', '.join(groups)} must share one dtype and device, got {found}")
    return scores


def energy_hinge_loss(scores: torch.Tensor, high: bool, margin: float = 5.0) -> torch.Tensor:
    r"""Mean energy term of a discriminator's raw scores ``s`` (any shape, any float dtype).

    ``high=False``: :math:`\mathrm{mean}(|s|)`; ``high=True``: :math:`\mathrm{mean}(\max(0, a - |s|))`
    with margin :math:`a`. Returns a 0-d float32 tensor (float64 for float64 scores).
    """
    check_float_tensor(scores, "scores")
    if scores.numel() == 0:
        raise ValueError(f"scores is empty (shape {tuple(scores.shape)}): the mean is undefined")
    return _energy([scores], [1.0], [bool(high)], real_arg(margin, "margin"))


def _as_layers(x, name: str) -> list:
    layers = [x] if isinstance(x, torch.Tensor) else list(x)
    if not layers:
        raise ValueError(f"{name} is empty: pass one score tensor per layer")
    return layers


def discriminator_loss(
    s_normal: Sequence[torch.Tensor],
    s_anomalous: Sequence[torch.Tensor],
    s_generated: Sequence[torch.Tensor],
    gamma: float = 0.5,
    margin: float = 5.0,
) -> torch.Tensor:
    r"""The patch discriminator's loss, Eq. 11 summed over layers:

    .. math:: \sum_s \mathrm{mean}|s^+| + (1-\gamma)\,\mathrm{mean}[a - |s^-|]^+ + \gamma\,\mathrm{mean}[a - |\tilde s|]^+

    Each argument holds one score tensor per layer (normal inputs, anomalous inputs,
    reconstructions); the batch sizes may differ between the three.
    """
    normal = _as_layers(s_normal, "s_normal")
    anomalous = _as_layers(s_anomalous, "s_anomalous")
    generated = _as_layers(s_generated, "s_generated")
    if not len(normal) == len(anomalous) == len(generated):
        raise ValueError(
            "s_normal, s_anomalous and s_generated must have one tensor per layer each, got "
            f"{len(normal)}, {len(anomalous)} and {len(generated)}"
        )
    gamma = real_arg(gamma, "gamma", hi=1.0)
    margin = real_arg(margin, "margin")
    L = len(normal)
    scores = _check_scores({"s_normal": normal, "s_anomalous": anomalous, "s_generated": generated})
    weights = [1.0] * L + [1.0 - gamma] * L + [float(gamma)] * L
    high = [False] * L + [True] * 2 * L
    return _energy(scores, weights, high, float(margin))


def generator_loss(s_generated: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The auto-encoder's adversarial loss, Eq. 12: :math:`\sum_s \mathrm{mean}|\tilde s|` over layers."""
    scores = _check_scores({"s_generated": _as_layers(s_generated, "s_generated")})
    return _energy(scores, [1.0] * len(scores), [False] * len(scores), 5.0)
