"""NVTX ranges for Nsight Systems, off unless asked for.

Turn them on with ``CKAAD_FAST_NVTX=1`` or :func:`enable_nvtx`. They use the ``nvtx`` package
(one domain, ``ckaad_fast``) rather than ``torch.cuda.nvtx``, which raises on CPU-only builds; where
the package is missing (images that ship torch but not it), CUDA builds of torch fall back to their
own bindings, in the default domain. The ranges step aside while torch.compile traces, so that
they never cause a graph break.
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


def nvtx_backend() -> str | None:
    """Which bindings the ranges use: 'nvtx' (the package), 'torch.cuda.nvtx', or None."""
    if _nvtx is not None:
        return "nvtx"
    if hasattr(torch._C, "_nvtx"):  # built into CUDA builds of torch only
        return "torch.cuda.nvtx"
    return None


def enable_nvtx(on: bool = True) -> None:
    """Emit NVTX ranges from now on (``on=False`` stops them); overrides ``CKAAD_FAST_NVTX``."""
    global _enabled
    _enabled = bool(on)


def nvtx_enabled() -> bool:
    on = _enabled if _enabled is not None else os.environ.get("CKAAD_FAST_NVTX", "0") not in ("", "0")
    return on and nvtx_backend() is not None


@contextlib.contextmanager
def _range(name: str):
    if _nvtx is not None:
        rng = _nvtx.start_range(message=name, domain=DOMAIN)
        try:
            yield
        finally:
            _nvtx.end_range(rng)
    else:
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()


def nvtx_range(name: str):
    """A context manager that marks ``name`` on the timeline when NVTX is on, and labels it
    ``ckaad_fast/<name>`` in a running torch.profiler (so that a trace carries the same ranges);
    else does nothing."""
    if torch.compiler.is_compiling():
        return contextlib.nullcontext()
    if torch.autograd._profiler_enabled():
        return stage(name)
    if not nvtx_enabled():
        return contextlib.nullcontext()
    return _range(name)


@contextlib.contextmanager
def stage(name: str):
    """An NVTX range (when on) and a torch.profiler label ``ckaad_fast/<name>`` (when profiling)
    around a stage that runs outside a compiled forward (copies, read-backs, a whole forward)."""
    with (_range(name) if nvtx_enabled() else contextlib.nullcontext()):
        if torch.autograd._profiler_enabled():
            with torch.profiler.record_function(f"{DOMAIN}/{name}"):
                yield
        else:
            yield


def torch_profiler(trace_dir: str | os.PathLike, n_batches: int, cuda: bool):
    """A ``torch.profiler.profile`` of a few batches (after the first, which warms up) that
    writes ``trace_dir/trace.json`` (atomically) for chrome://tracing or Perfetto. Step it once
    per batch (``prof.step``); with one batch it records that batch."""
    from .atomic import atomic_path

    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = None
    if n_batches >= 2:
        schedule = torch.profiler.schedule(wait=0, warmup=1, active=min(3, n_batches - 1), repeat=1)

    def export(prof) -> None:
        with atomic_path(os.path.join(os.fspath(trace_dir), "trace.json")) as tmp:
            prof.export_chrome_trace(tmp)

    return torch.profiler.profile(activities=activities, schedule=schedule, on_trace_ready=export)
