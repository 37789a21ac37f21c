"""The native CPU kernels (``cpu_kernels.c``): built on first use, loaded with ctypes.

The library is compiled once per machine with the system's C compiler (``$CC``, else ``cc``,
``gcc`` or ``clang``: the compiler ``torch.compile`` needs on a CPU) for this CPU
(``-march=native``), and cached under ``$CKAAD_FAST_CACHE_DIR`` (default
``~/.cache/ckaad_fast``), keyed by the source, the compiler, its flags and the CPU, so a home
folder shared between different machines keeps one build per machine. Building takes about half
a second; the file appears atomically (written aside, then renamed), so concurrent first uses do
not see a half-written library.

Flags are tried in the order of :data:`VARIANTS` (OpenMP and this CPU's vector width first); a
variant that fails to build is remembered in the cache (``.failed``), so later processes do not
compile it again. Where nothing can be built or loaded (no compiler, an unsupported platform),
:func:`library` returns None and :data:`BUILD_ERROR` says why: the ops then run their PyTorch
paths. Like the Triton
launchers, the wrappers take tensors and sizes, check what the C code relies on, and allocate
their outputs; they know nothing of models.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.c")
# No -ffast-math, so NaN and infinity behave as in PyTorch.
FLAGS = ("-O3", "-fPIC", "-shared", "-pthread", "-fno-math-errno")
# Tried in this order until one builds. -fopenmp: the threads are torch's own OpenMP workers (the
# loader resolves libgomp.so.1 to the copy torch loaded; see cpu_kernels.c); -fopenmp-simd: the
# loops still vectorise, the threads are POSIX ones. -march=native: this CPU's vector width.
VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native", "-fopenmp-simd"), ())

#: Why the library could not be built or loaded, or None (also None before the first try).
BUILD_ERROR: str | None = None
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False

_P, _L, _F, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_float, ctypes.c_int


def compiler() -> str | None:
    """The C compiler the build uses, or None when there is none."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    root = os.environ.get("CKAAD_FAST_CACHE_DIR")
    if root:
        return Path(root) / "native"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ckaad_fast" / "native"


def _cpu_signature() -> str:
    """What -march=native depends on: the CPU model and its feature flags."""
    sig = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "flags", "Features", "CPU part")):
                    sig.append(line.strip())
                if line.strip() == "":  # the first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(sig)


def _compile(cc: str, out: Path, variant: tuple[str, ...]) -> subprocess.CompletedProcess:
    cmd = [cc, *FLAGS, *variant, "-o", str(out), str(SOURCE), "-lm"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _build(cc: str, version: str, variant: tuple[str, ...]) -> Path:
    """The library built with ``variant``'s flags: from the cache, else compiled into it. A
    failed build is remembered beside it (``.failed``, the compiler's message), so that later
    processes go straight to the next variant."""
    key = hashlib.sha256(b"\0".join(x.encode() for x in (
        SOURCE.read_text(), cc, version, repr((FLAGS, variant)), _cpu_signature(), sys.platform))).hexdigest()[:16]
    target = cache_dir() / f"cpu_kernels-{key}.so"
    failed = target.with_suffix(".failed")
    if target.exists():
        return target
    if failed.exists():
        raise RuntimeError(failed.read_text())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        folder = target.parent
    except OSError:  # a read-only home: build into a private temporary folder instead
        folder = Path(tempfile.mkdtemp(prefix="ckaad_fast_native_"))
        target, failed = folder / target.name, folder / failed.name
    fd, tmp = tempfile.mkstemp(prefix=".building-", suffix=".so", dir=folder)
    os.close(fd)
    try:
        proc = _compile(cc, Path(tmp), variant)
        if proc.returncode != 0:
            message = f"{Path(cc).name} {' '.join(variant)} failed to build {SOURCE.name}: {proc.stderr.strip()[-800:]}"
            with contextlib.suppress(OSError):
                failed.write_text(message)
            raise RuntimeError(message)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.ckf_cosine_map.argtypes = [_P, _P, _P, _P, _L, _L, _L, _I, _F, _I]
    lib.ckf_cosine_map.restype = _I
    lib.ckf_energy.argtypes = [_I, _P, _P, _P, _P, _P, _F, _F]
    lib.ckf_energy.restype = ctypes.c_double
    lib.ckf_energy_grad.argtypes = [_I, _P, _P, _P, _P, _P, _F, _F]
    lib.ckf_energy_grad.restype = None
    lib.ckf_upsample_blur_sum.argtypes = [_I, _P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _P, _P, _I]
    lib.ckf_upsample_blur_sum.restype = None
    lib.ckf_flat_sums.argtypes = [_P, _P, _P, _L, _L, _I]
    lib.ckf_flat_sums.restype = None
    lib.ckf_flat_grads.argtypes = [_P, _P, _P, _P, _P, _L, _L, _I]
    lib.ckf_flat_grads.restype = None
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on the first call; None when they cannot be had. Each
    of :data:`VARIANTS` in turn until one builds and loads (one may build and still not load,
    e.g. against an OpenMP run time older than the compiler's)."""
    global _lib, _tried, BUILD_ERROR
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            errors = []
            try:
                cc = compiler()
                if cc is None:
                    raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
                version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
                for variant in VARIANTS:
                    try:
                        _lib = _declare(ctypes.CDLL(str(_build(cc, version, variant))))
                        break
                    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as e:
                        errors.append(f"{type(e).__name__}: {e}")
            except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                errors.append(f"{type(e).__name__}: {e}")
            BUILD_ERROR = None if _lib is not None else errors[-1]
            _tried = True
    return _lib


def _threads() -> int:
    return max(1, torch.get_num_threads())


# --------------------------------------------------------------------------------------------
# Cosine error map
# --------------------------------------------------------------------------------------------
def cosine_layout(a: torch.Tensor, b: torch.Tensor) -> str | None:
    """'nchw' or 'rows' (channels_last) when the kernel reads this float32 CPU pair in place, else None."""
    if a.dtype != torch.float32 or b.dtype != torch.float32 or a.device.type != "cpu" or b.device.type != "cpu":
        return None
    if a.dim() != 4 or a.shape != b.shape:
        return None
    if a.is_contiguous() and b.is_contiguous():
        return "nchw"
    cl = torch.channels_last
    if a.is_contiguous(memory_format=cl) and b.is_contiguous(memory_format=cl):
        return "rows"
    return None


def cosine_map(a: torch.Tensor, b: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``1 - cos`` over channels of two (N, C, H, W) float32 tensors laid out as
    :func:`cosine_layout` accepts, and the stats (cos, |a|, |b|) stacked as (3, N, H, W)."""
    layout = cosine_layout(a, b)
    if layout is None:
        raise ValueError("cosine_map needs two same-shape float32 CPU tensors, both NCHW-contiguous or both "
                         f"channels_last, got {a.dtype} {tuple(a.shape)} {a.stride()} and {b.dtype} {tuple(b.shape)} "
                         f"{b.stride()}")
    lib = library()
    N, C, H, W = a.shape
    err = a.new_empty((N, H, W))
    stats = a.new_empty((3, N, H, W))
    if err.numel():
        lib.ckf_cosine_map(a.data_ptr(), b.data_ptr(), err.data_ptr(), stats.data_ptr(), N, C, H * W,
                           int(layout == "rows"), float(eps), _threads())
    return err, stats


# --------------------------------------------------------------------------------------------
# Hinge energy losses
# --------------------------------------------------------------------------------------------
# At the score maps' sizes the C loop takes ~35 us for nine terms, so what surrounds it counts:
# the per-term constants are built once per (sizes, weights, kinds) and the tensors are passed as
# they lie (any contiguous shape: the loops only need each term's elements in memory order).
_CONSTS: dict[tuple, tuple] = {}
_MAX_CONSTS = 64


def _energy_args(scores, weights, high):
    for t in scores:
        if t.dtype != torch.float32 or not t.is_contiguous() or t.is_cuda:
            raise ValueError(f"energy kernels take contiguous float32 CPU tensors, got {t.dtype} "
                             f"{tuple(t.shape)} with strides {t.stride()} on {t.device}")
    K = len(scores)
    key = (tuple(t.numel() for t in scores), tuple(weights), tuple(high))
    consts = _CONSTS.get(key)
    if consts is None:
        consts = ((_L * K)(*key[0]), (_F * K)(*weights), (_I * K)(*[int(h) for h in high]))
        if len(_CONSTS) >= _MAX_CONSTS:
            _CONSTS.pop(next(iter(_CONSTS)))
        _CONSTS[key] = consts
    return K, (_P * K)(*[t.data_ptr() for t in scores]), *consts


def energy(scores: list[torch.Tensor], weights: list[float], high: list[bool], margin: float,
           want_grads: bool, scale: float = 1.0) -> tuple[float, list[torch.Tensor] | None]:
    """``sum_k weights[k] * sum_i f_k(scores[k].flat[i])`` (f = |s|, or max(0, margin - |s|)
    where ``high[k]``) over contiguous float32 tensors, summed in float32 chunks and double across
    them; with ``want_grads`` also each term's gradient times ``scale``, shaped like its term,
    written in the same pass."""
    K, s, n, w, h = _energy_args(scores, weights, high)
    grads = [torch.empty_like(t) for t in scores] if want_grads else None
    g = (_P * K)(*[t.data_ptr() for t in grads]) if want_grads else None
    total = library().ckf_energy(K, s, g, n, w, h, float(margin), float(scale))
    return total, grads


def energy_grad(scores: list[torch.Tensor], weights: list[float], high: list[bool], margin: float,
                scale: float) -> list[torch.Tensor]:
    """Each term's gradient of :func:`energy` times ``scale``, without the loss."""
    K, s, n, w, h = _energy_args(scores, weights, high)
    grads = [torch.empty_like(t) for t in scores]
    library().ckf_energy_grad(K, s, (_P * K)(*[t.data_ptr() for t in grads]), n, w, h, float(margin), float(scale))
    return grads


# --------------------------------------------------------------------------------------------
# Upsampling, sum over layers and blur
# --------------------------------------------------------------------------------------------
#: The most maps (layers) one call takes (the C code's per-layer offsets live on its stack).
MAX_MAPS = 64


def row_bands(m: torch.Tensor) -> torch.Tensor:
    """(rows, 2) int64: each row's nonzero columns lie in [lo, hi) (lo == hi for a zero row)."""
    n = m.shape[1]
    idx = torch.arange(n, device=m.device)
    nz = m != 0
    lo = torch.where(nz, idx, n).amin(1)
    hi = torch.where(nz, idx + 1, 0).amax(1)
    return torch.stack([torch.minimum(lo, hi), hi], 1).to(torch.long).contiguous()


def upsample_blur_sum(maps: list[torch.Tensor], rows: list[torch.Tensor], cols_t: list[torch.Tensor],
                      row_bands_: list[torch.Tensor], col_bands: list[torch.Tensor], out_h: int,
                      out_w: int) -> torch.Tensor:
    """``sum_s rows[s] @ maps[s] @ cols_t[s]`` per image, (B, out_h, out_w) float32, over each
    matrix row's band only (:func:`row_bands` of ``rows[s]`` and of ``cols_t[s]``). maps: (B, h_s,
    w_s) float32 CPU; rows[s]: (out_h, h_s); cols_t[s]: (w_s, out_w)."""
    S, B = len(maps), maps[0].shape[0]
    for m, r, c, rb, cb in zip(maps, rows, cols_t, row_bands_, col_bands):
        h, w = m.shape[1], m.shape[2]
        ok = (m.dtype == r.dtype == c.dtype == torch.float32 and m.dim() == 3 and m.shape[0] == B
              and tuple(r.shape) == (out_h, h) and tuple(c.shape) == (w, out_w)
              and tuple(rb.shape) == (out_h, 2) and tuple(cb.shape) == (w, 2) and rb.dtype == cb.dtype == torch.long
              and all(t.is_contiguous() and not t.is_cuda for t in (m, r, c, rb, cb)))
        if not ok:
            raise ValueError(f"upsample_blur_sum: a map {tuple(m.shape)} {m.dtype} does not match its matrices "
                             f"{tuple(r.shape)}, {tuple(c.shape)} and bands for an ({out_h}, {out_w}) output "
                             "(all contiguous float32 CPU tensors, bands int64)")
    ptrs = lambda ts: (_P * S)(*[t.data_ptr() for t in ts])  # noqa: E731
    out = maps[0].new_empty((B, out_h, out_w))
    threads = _threads()
    if S > MAX_MAPS:
        raise ValueError(f"upsample_blur_sum takes at most {MAX_MAPS} maps, got {S}")
    scratch = maps[0].new_empty((threads * sum(m.shape[1] for m in maps) * out_w,))
    library().ckf_upsample_blur_sum(
        S, ptrs(maps), ptrs(rows), ptrs(cols_t), ptrs(row_bands_), ptrs(col_bands),
        (_L * S)(*[m.shape[1] for m in maps]), (_L * S)(*[m.shape[2] for m in maps]),
        B, out_h, out_w, out.data_ptr(), scratch.data_ptr(), threads)
    return out


# --------------------------------------------------------------------------------------------
# The flattened cosine loss
# --------------------------------------------------------------------------------------------
def _check_rows(*ts: torch.Tensor) -> None:
    shape = ts[0].shape
    for t in ts:
        if t.dtype != torch.float32 or t.dim() != 2 or t.shape != shape or not t.is_contiguous() or t.is_cuda:
            raise ValueError(f"flat cosine kernels take same-shape contiguous (rows, n) float32 CPU tensors, got "
                             f"{t.dtype} {tuple(t.shape)} (first {tuple(shape)})")


def flat_sums(a2d: torch.Tensor, b2d: torch.Tensor) -> torch.Tensor:
    """(rows, 3) float32: each row's (a.b, |a|^2, |b|^2), one read of both; float32 lanes over
    chunks of 4096, double across them."""
    _check_rows(a2d, b2d)
    sums = a2d.new_empty((a2d.shape[0], 3))
    if a2d.numel():
        library().ckf_flat_sums(a2d.data_ptr(), b2d.data_ptr(), sums.data_ptr(), a2d.shape[0], a2d.shape[1],
                                _threads())
    else:
        sums.zero_()
    return sums


def flat_grads(a2d: torch.Tensor, b2d: torch.Tensor, coef: torch.Tensor, need_a: bool, need_b: bool,
               out_a: torch.Tensor | None = None, out_b: torch.Tensor | None = None):
    """``(k_ab b + k_aa a, k_ab a + k_bb b)`` per row for ``coef`` (rows, 3) = (k_ab, k_aa, k_bb),
    into ``out_a``/``out_b`` when given (else new tensors); None for a gradient not needed."""
    _check_rows(a2d, b2d)
    coef = coef.to(torch.float32).contiguous()
    if tuple(coef.shape) != (a2d.shape[0], 3):
        raise ValueError(f"coef must be ({a2d.shape[0]}, 3), got {tuple(coef.shape)}")
    ga = (a2d.new_empty(a2d.shape) if out_a is None else out_a) if need_a else None
    gb = (b2d.new_empty(b2d.shape) if out_b is None else out_b) if need_b else None
    for g in (ga, gb):
        if g is not None:
            _check_rows(a2d, g)
    if a2d.numel() and (need_a or need_b):
        library().ckf_flat_grads(a2d.data_ptr(), b2d.data_ptr(), coef.data_ptr(), ga.data_ptr() if need_a else None,
                                 gb.data_ptr() if need_b else None, a2d.shape[0], a2d.shape[1], _threads())
    return ga, gb
