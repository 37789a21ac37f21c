"""NVTX ranges for Nsight Systems, off unless asked for.

Turn them on with ``CKAAD_FAST_NVTX=1`` or :func:`enable_nvtx`. They use the ``nvtx`` package
(one domain, ``ckaad_fast``) rather than ``torch.cuda.nvtx``, which raises on CPU-only builds, and
step aside while torch.compile traces, so that they never cause a graph break.
"""
from __future__ import annotations

import contextlib
import os

import torch

try:
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - nvtx is a dependency, but profiling must never break a run
    _nvtx = None

DOMAIN = "ckaad_fast"
_enabled: bool | None = None


def enable_nvtx(on: bool = True) -> None:
    """Emit NVTX ranges from now on (``on=False`` stops them); overrides ``CKAAD_FAST_NVTX``."""
    global _enabled
    _enabled = bool(on)


def nvtx_enabled() -> bool:
    if _enabled is not None:
        return _enabled and _nvtx is not None
    return _nvtx is not None and os.environ.get("CKAAD_FAST_NVTX", "0") not in ("", "0")


@contextlib.contextmanager
def _range(name: str):
    rng = _nvtx.start_range(message=name, domain=DOMAIN)
    try:
        yield
    finally:
        _nvtx.end_range(rng)


def nvtx_range(name: str):
    """A context manager that marks ``name`` on the timeline when NVTX is on, else does nothing."""
    if torch.compiler.is_compiling() or not nvtx_enabled():
        return contextlib.nullcontext()
    return _range(name)
