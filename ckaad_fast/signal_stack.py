"""A large enough alternate signal stack for the main thread.

Why: ``faulthandler.enable()`` (the CLI's, or pytest's plugin) gives the main thread an alternate
signal stack of ``2 * sysconf(_SC_SIGSTKSZ)`` bytes (9,968 on a 2-core AVX2 EPYC), and CPython
installs every Python-level signal handler with ``SA_ONSTACK``, so they all run on it. The
SIGCHLD handler a DataLoader with worker processes installs ran there when a worker exited, the
dynamic linker resolved a symbol for it on the way (``_dl_runtime_resolve_xsavec`` saves the
vector registers on the stack) and the stack overflowed: a SIGSEGV with no Python traceback, at a
different test each time, in processes that had also loaded OpenVINO and ONNX Runtime (their
threads and memory moved where and when it happened). A core dump showed the main thread's stack
pointer 576 bytes below the alternate stack, inside ``trip_signal(SIGCHLD)``.

:func:`ensure_signal_stack` replaces a smaller alternate stack of the calling thread with one of
``min_bytes`` (256 KiB by default), allocated once and never freed (a signal may arrive during
interpreter shutdown, after Python objects are gone). faulthandler keeps working: its handler
runs on whatever alternate stack is in place. Linux and glibc only; elsewhere it does nothing.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading

__all__ = ["ensure_signal_stack", "signal_stack_size", "DEFAULT_BYTES"]

DEFAULT_BYTES = 256 * 1024
_SS_DISABLE = 2
_lock = threading.Lock()


class _StackT(ctypes.Structure):  # struct stack_t on Linux (x86-64 and aarch64)
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.sigaltstack.argtypes = [ctypes.POINTER(_StackT), ctypes.POINTER(_StackT)]
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.malloc.restype = ctypes.c_void_p
    return libc


def signal_stack_size() -> int | None:
    """The calling thread's alternate signal stack size in bytes: 0 when it has none, None where
    this cannot be asked (not Linux)."""
    libc = _libc()
    if libc is None:
        return None
    old = _StackT()
    if libc.sigaltstack(None, ctypes.byref(old)) != 0:
        return None
    return 0 if old.ss_flags & _SS_DISABLE else int(old.ss_size)


def ensure_signal_stack(min_bytes: int = DEFAULT_BYTES) -> bool:
    """Give the calling thread an alternate signal stack of at least ``min_bytes`` where it has a
    smaller one (see the module). Returns whether it installed one. A thread without an alternate
    stack keeps running its handlers on its own stack, which is large: left alone."""
    libc = _libc()
    if libc is None:
        return False
    with _lock:
        old = _StackT()
        if libc.sigaltstack(None, ctypes.byref(old)) != 0:
            return False
        if old.ss_flags & _SS_DISABLE or old.ss_size >= min_bytes:
            return False
        memory = libc.malloc(min_bytes)  # never freed: see the module
        if not memory:
            return False
        new = _StackT(memory, 0, min_bytes)
        return libc.sigaltstack(ctypes.byref(new), None) == 0
