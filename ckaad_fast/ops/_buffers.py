"""Reusable output buffers for the CPU paths' large gradients.

On the CPU, every fresh tensor of tens of megabytes comes from the kernel as untouched pages
(glibc serves allocations over its mmap threshold with mmap, and returns them on free), so the
first write of each page faults. For the reconstruction loss at WideResNet50's shapes that is
23 ms per gradient set against 12 ms of arithmetic (measured on a 2-core Xeon): most of the
backward. The gradients of one training step are dead by the next step, so the backward can
write into the buffers of the last one, as PyTorch's CUDA caching allocator does for GPU memory.

:func:`reusable_empty` hands out a cached buffer only when nothing but the cache holds its
storage (no tensor, view or autograd node of a caller still refers to it), so a caller never
sees its tensor change; otherwise it allocates, and caches the new one. The cost is memory: one
buffer per shape and dtype stays allocated after the last call (about the size of one set of
gradients); :func:`release_buffers` frees them.
"""
from __future__ import annotations

import threading

import torch

__all__ = ["reusable_empty", "release_buffers", "MIN_REUSE_BYTES"]

#: Smaller tensors come from the allocator's heap anyway: not worth caching.
MIN_REUSE_BYTES = 1 << 20
_MAX_BUFFERS = 16
_PER_SHAPE = 2  # a backward may need two at once (the gradients of both operands)
_lock = threading.Lock()
_cache: dict[tuple, list[torch.Tensor]] = {}


_use_count = getattr(torch._C, "_storage_Use_Count", None)


def _free(t: torch.Tensor) -> bool:
    # The count includes the cache's own tensor and the temporary storage object of this call.
    # (A torch without the counter never reuses: always correct, only slower.)
    return _use_count is not None and _use_count(t.untyped_storage()._cdata) <= 2


def reusable_empty(shape, dtype: torch.dtype, device) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor, from the cache when one of that shape and dtype
    is no longer used by anyone (see the module); the caller must overwrite all of it."""
    device = torch.device(device)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    if device.type != "cpu" or nbytes < MIN_REUSE_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    key = (tuple(shape), dtype)
    with _lock:
        pool = _cache.setdefault(key, [])
        for t in pool:
            if _free(t):
                return t.view(t.shape)  # a new tensor object on the same storage: the caller's
        # None is free: a new one, cached in place of the oldest (which a caller may keep for
        # good, e.g. as a leaf's .grad, which autograd takes over instead of copying).
        t = torch.empty(shape, dtype=dtype)
        if len(pool) >= _PER_SHAPE:
            pool.pop(0)
        if sum(len(p) for p in _cache.values()) < _MAX_BUFFERS:
            pool.append(t)
            return t.view(t.shape)
        return t


def release_buffers() -> None:
    """Free every cached gradient buffer (they are re-made on the next backward)."""
    with _lock:
        _cache.clear()
