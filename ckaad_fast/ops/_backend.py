"""Which implementation runs: the Triton kernels or the PyTorch paths.

``CKAAD_FAST_BACKEND=auto|triton|torch`` (read at every call) or the :func:`backend` context
manager, which wins over the variable:

- ``auto``: Triton for CUDA tensors, PyTorch for CPU tensors.
- ``triton``: Triton everywhere; CPU tensors then need Triton's interpreter (``TRITON_INTERPRET=1``
  set before the package is imported). This is how CI, which has no GPU, tests the kernels.
- ``torch``: the PyTorch paths everywhere.
"""
from __future__ import annotations

import contextlib
import os
import threading

import torch

BACKENDS = ("auto", "triton", "torch")
_local = threading.local()

# The interpreter is chosen when @triton.jit runs, i.e. when the kernels are imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:  # Triton is optional at run time: without it every tensor takes the PyTorch path.
    from ckaad_fast.kernels import cosine as cosine_kernels
    from ckaad_fast.kernels import energy as energy_kernels
    from ckaad_fast.kernels import upsample_blur as upsample_blur_kernels
except ImportError:  # pragma: no cover - depends on the platform
    cosine_kernels = energy_kernels = upsample_blur_kernels = None


def current_backend() -> str:
    name = getattr(_local, "override", None) or os.environ.get("CKAAD_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"CKAAD_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Run the ops in this block with backend ``name`` ('auto', 'triton' or 'torch')."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    previous = getattr(_local, "override", None)
    _local.override = name
    try:
        yield
    finally:
        _local.override = previous


def use_triton(t: torch.Tensor) -> bool:
    """Whether the op on tensor ``t`` runs the Triton kernels."""
    choice = current_backend()
    if choice == "torch" or cosine_kernels is None:
        if choice == "triton" and cosine_kernels is None:
            raise RuntimeError("backend 'triton' was asked for, but triton cannot be imported")
        return False
    if t.device.type == "cuda":
        return True
    if choice == "triton":
        if t.device.type == "cpu" and _INTERPRET:
            return True
        raise RuntimeError(
            f"backend 'triton' on {t.device.type} tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing ckaad_fast, or use backend 'auto'"
        )
    return False
