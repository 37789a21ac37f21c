"""Second derivatives of the fused ops: their backward passes are hand-written kernels (and
custom ops) that autograd cannot differentiate again. Under ``create_graph=True`` (gradient
penalties, Hessian-vector products) each backward instead takes autograd's derivatives of the
op's own formula in plain PyTorch, which autograd can differentiate as often as asked. The first
derivatives are the same up to rounding; only double backward pays for the slower path."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["wants_double_backward", "grads_by_autograd", "safe_norm"]


def wants_double_backward() -> bool:
    """True inside a backward called with ``create_graph=True`` (autograd then records it)."""
    return torch.is_grad_enabled()


def safe_norm(sq: torch.Tensor, eps: float) -> torch.Tensor:
    """``max(sqrt(sq), eps)`` written as ``sqrt(max(sq, eps^2))``: the same value, and a
    derivative that is 0 (not 0 * inf) where the norm is below eps."""
    return sq.clamp_min(eps * eps).sqrt()


def grads_by_autograd(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], needs: Sequence[bool],
                      grad_output: torch.Tensor) -> list:
    """The vector-Jacobian product of ``fn(*inputs)`` with ``grad_output`` for the inputs in
    ``needs``, recorded by autograd (None for the others)."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    if not wanted:
        return [None] * len(needs)
    with torch.enable_grad():
        out = fn(*inputs)
        got = iter(torch.autograd.grad(out, wanted, grad_output, create_graph=True, allow_unused=True))
    res = []
    for t, need in zip(inputs, needs):
        if not need:
            res.append(None)
            continue
        g = next(got)
        res.append(torch.zeros_like(t) if g is None else g)
    return res
