"""Views that let the kernels read tensors in memory order, whatever their layout."""
from __future__ import annotations

from typing import Callable

import torch


def _memory_order(t: torch.Tensor) -> list[int]:
    # Batch stays outermost; the other dims go from the largest stride to the smallest.
    rest = sorted(range(1, t.dim()), key=lambda d: -t.stride(d))
    return [0, *rest]


def rows_in_memory_order(a: torch.Tensor, b: torch.Tensor):
    """(B, N) views of two same-shape tensors whose rows are contiguous, and the way back.

    Reductions over a whole sample (a flattened cosine, a mean) do not depend on the order of the
    elements, only on both operands using the same one. So a channels_last pair is read as it lies
    in memory instead of being copied to NCHW. Returns ``(a2d, b2d, restore)`` where ``restore``
    turns a contiguous (B, N) gradient into a tensor shaped and laid out like ``a``.
    """
    B = a.shape[0]
    order = _memory_order(a)
    ap, bp = a.permute(order), b.permute(order)
    if not ap.is_contiguous():
        ap = ap.contiguous()
    if not bp.is_contiguous():
        bp = bp.contiguous()
    inverse = [order.index(d) for d in range(a.dim())]
    shape_p = ap.shape

    def restore(grad2d: torch.Tensor) -> torch.Tensor:
        return grad2d.view(shape_p).permute(inverse)

    return ap.reshape(B, -1), bp.reshape(B, -1), restore


def flat_in_memory_order(t: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A 1-D view of ``t`` in memory order (a copy only when ``t`` is not dense), and the way back."""
    if t.is_contiguous():
        return t.view(-1), lambda g: g.view(t.shape)
    flat2d, _, restore = rows_in_memory_order(t.unsqueeze(0), t.unsqueeze(0))
    return flat2d.reshape(-1), lambda g: restore(g.reshape(1, -1)).squeeze(0)
