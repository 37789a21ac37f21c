"""Hinge energy losses of CKAAD's energy-based discriminators (Eq. 8/9/11/12).

The energy of a patch is |s|, the absolute raw score of the discriminator. Normal features should
get low energy (the loss is mean |s|), generated and anomalous ones at least the margin (the loss
is mean max(0, margin - |s|)). Each term is one op with a fused one-pass forward and backward.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._backend import energy_kernels, use_triton
from ._checks import check_float_tensor
from ._layout import flat_in_memory_order

_DEVICES = ("cpu", "cuda")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.custom_op("ckaad_fast::energy_hinge_loss", mutates_args=(), device_types=_DEVICES)
def _energy_op(scores: torch.Tensor, margin: float, high: bool) -> torch.Tensor:
    flat, _ = flat_in_memory_order(scores)
    if use_triton(scores):
        total = energy_kernels.energy_sum(flat, margin, high)
    else:
        e = flat.to(_acc_dtype(flat.dtype)).abs()
        total = torch.relu(margin - e).sum() if high else e.sum()
    return total / scores.numel()


@_energy_op.register_fake
def _(scores, margin, high):
    return scores.new_empty((), dtype=_acc_dtype(scores.dtype))


@torch.library.custom_op("ckaad_fast::energy_hinge_loss_backward", mutates_args=(), device_types=_DEVICES)
def _energy_backward_op(scores: torch.Tensor, grad: torch.Tensor, margin: float, high: bool) -> torch.Tensor:
    flat, restore = flat_in_memory_order(scores)
    scale = grad.to(_acc_dtype(scores.dtype)) / scores.numel()
    if use_triton(scores):
        g = energy_kernels.energy_backward(flat, scale, margin, high)
    else:
        s = flat.to(scale.dtype)
        g = torch.sign(s)
        if high:
            g = torch.where(margin - s.abs() > 0, -g, torch.where(s.isnan(), s, 0))
        g = (g * scale).to(scores.dtype)
    return restore(g)


@_energy_backward_op.register_fake
def _(scores, grad, margin, high):
    return torch.empty_like(scores)


def _setup(ctx, inputs, output):
    scores, margin, high = inputs
    ctx.save_for_backward(scores)
    ctx.margin, ctx.high = margin, high


def _backward(ctx, grad):
    (scores,) = ctx.saved_tensors
    return _energy_backward_op(scores, grad, ctx.margin, ctx.high), None, None


_energy_op.register_autograd(_backward, setup_context=_setup)


def energy_hinge_loss(scores: torch.Tensor, high: bool, margin: float = 5.0) -> torch.Tensor:
    r"""Mean energy term of a discriminator's raw scores ``s`` (any shape, any float dtype).

    ``high=False``: :math:`\mathrm{mean}(|s|)`; ``high=True``: :math:`\mathrm{mean}(\max(0, a - |s|))`
    with margin :math:`a`. Returns a 0-d float32 tensor (float64 for float64 scores).
    """
    check_float_tensor(scores, "scores")
    if scores.numel() == 0:
        raise ValueError(f"scores is empty (shape {tuple(scores.shape)}): the mean is undefined")
    return _energy_op(scores, float(margin), bool(high))


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
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    total = None
    for n, a, g in zip(normal, anomalous, generated):
        term = (
            energy_hinge_loss(n, False, margin)
            + (1 - gamma) * energy_hinge_loss(a, True, margin)
            + gamma * energy_hinge_loss(g, True, margin)
        )
        total = term if total is None else total + term
    return total


def generator_loss(s_generated: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""The auto-encoder's adversarial loss, Eq. 12: :math:`\sum_s \mathrm{mean}|\tilde s|` over layers."""
    total = None
    for s in _as_layers(s_generated, "s_generated"):
        term = energy_hinge_loss(s, False)
        total = term if total is None else total + term
    return total
