"""Which implementation runs: the Triton kernels, the native CPU kernels or the PyTorch paths.

``CKAAD_FAST_BACKEND=auto|triton|native|torch`` (read at every call) or the :func:`backend`
context manager, which wins over the variable:

- ``auto``: Triton for CUDA tensors; for float32 CPU tensors the native C kernels
  (``kernels/cpu_kernels.c``, built on first use) where the op has one and they could be built,
  else the PyTorch paths.
- ``triton``: Triton everywhere; CPU tensors then need Triton's interpreter (``TRITON_INTERPRET=1``
  set before the package is imported). This is how CI, which has no GPU, tests the kernels.
- ``native``: as ``auto``, but an error when the native kernels cannot be built (tests use it).
- ``torch``: the PyTorch paths everywhere.

When the kernels cannot be imported (no Triton, or a broken one), the library says so once, with
the import error, and CPU tensors take the PyTorch paths as always; a CUDA tensor on ``auto``
raises instead of silently running the CPU path's code on the GPU, ten times slower. Choose
``torch`` to run that code on purpose.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings

import torch

from ckaad_fast.kernels import native as native_kernels

BACKENDS = ("auto", "triton", "native", "torch")
_local = threading.local()

# The interpreter is chosen when @triton.jit runs, i.e. when the kernels are imported.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

#: Why the kernels could not be imported ("ImportError: ..."), or None when they were.
KERNELS_IMPORT_ERROR: str | None = None
try:  # Triton is optional at run time: without it CPU tensors take the PyTorch path.
    from ckaad_fast.kernels import cosine as cosine_kernels
    from ckaad_fast.kernels import energy as energy_kernels
    from ckaad_fast.kernels import upsample_blur as upsample_blur_kernels
except ImportError as e:
    cosine_kernels = energy_kernels = upsample_blur_kernels = None
    KERNELS_IMPORT_ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(
        f"ckaad_fast: the Triton kernels cannot be imported ({KERNELS_IMPORT_ERROR}); CPU tensors take the "
        "PyTorch paths, and CUDA tensors raise unless CKAAD_FAST_BACKEND=torch",
        RuntimeWarning,
        stacklevel=2,
    )


def current_backend() -> str:
    name = getattr(_local, "override", None) or os.environ.get("CKAAD_FAST_BACKEND", "auto")
    if name not in BACKENDS:
        raise ValueError(f"CKAAD_FAST_BACKEND must be one of {BACKENDS}, got {name!r}")
    return name


@contextlib.contextmanager
def backend(name: str):
    """Run the ops in this block with backend ``name`` ('auto', 'triton', 'native' or 'torch')."""
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
    if choice == "torch":
        return False
    if cosine_kernels is None:
        if choice == "triton":
            raise RuntimeError(f"backend 'triton' was asked for, but the kernels cannot be imported "
                               f"({KERNELS_IMPORT_ERROR})")
        if t.device.type == "cuda":
            raise RuntimeError(
                f"the Triton kernels cannot be imported ({KERNELS_IMPORT_ERROR}), so CUDA tensors have no "
                "kernel to run: repair the Triton install, or set CKAAD_FAST_BACKEND=torch (or use "
                "ckaad_fast.ops.backend('torch')) to run the PyTorch paths on the GPU"
            )
        return False
    if t.device.type == "cuda":
        return True
    if choice in ("auto", "native"):
        return False
    if choice == "triton":
        if t.device.type == "cpu" and _INTERPRET:
            return True
        raise RuntimeError(
            f"backend 'triton' on {t.device.type} tensors needs Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing ckaad_fast, or use backend 'auto'"
        )
    return False


_native_warned = False


def use_native(t: torch.Tensor) -> bool:
    """Whether an op on CPU tensor ``t`` runs the native C kernels: on backend ``auto`` or
    ``native``, for float32 (other dtypes take the PyTorch paths), once the kernels are built.
    Where a compiler exists but the build fails, ``auto`` says so once and runs the PyTorch
    paths; ``native`` raises. Without any compiler ``auto`` stays silent: the PyTorch paths are
    the documented fallback."""
    global _native_warned
    choice = current_backend()
    if choice not in ("auto", "native") or t.device.type != "cpu" or t.dtype != torch.float32:
        return False
    if native_kernels.library() is not None:
        return True
    if choice == "native":
        raise RuntimeError(f"backend 'native' was asked for, but the native CPU kernels cannot be built "
                           f"({native_kernels.BUILD_ERROR})")
    if not _native_warned and native_kernels.compiler() is not None:
        _native_warned = True
        warnings.warn(f"ckaad_fast: the native CPU kernels could not be built ({native_kernels.BUILD_ERROR}); "
                      "CPU tensors take the PyTorch paths", RuntimeWarning, stacklevel=2)
    return False


def eager_cpu_path(tensors) -> bool:
    """Whether a loss on ``tensors`` may run as a plain ``torch.autograd.Function`` instead of its
    ``custom_op``: CPU tensors on the PyTorch path, in plain eager mode (not traced by
    ``torch.compile``/``torch.export``, no functorch transform, no dispatch mode such as
    make_fx's or FakeTensor's, no tensor subclass). The two compute the same thing; the
    Function skips the Python of the autograd wrapper ``custom_op`` generates (150-300 µs per
    forward + backward, measured), which is the whole cost of a loss over small score maps.
    Anything that traces still sees the registered op."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    t = tensors[0]
    if t.device.type != "cpu" or use_triton(t) or torch.compiler.is_compiling():
        return False
    if torch._C._are_functorch_transforms_active() or _get_current_dispatch_mode() is not None:
        return False
    return all(type(x) is torch.Tensor for x in tensors)
