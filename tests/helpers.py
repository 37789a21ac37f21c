"""Shared test helpers: input makers for every layout, and the tolerance rule of docs/ARCHITECTURE.md."""
from __future__ import annotations

import torch
from hypothesis import assume

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("contiguous", "channels_last", "sliced", "transposed")

# ||out - ref|| / ||ref|| against the float64 reference, per dtype (docs/ARCHITECTURE.md, "Numerical semantics").
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p of a floating-point type (half the distance from 1 to the next number)."""
    return torch.finfo(dtype).eps / 2


def sum_error_bound(n: int, abs_sum, acc_dtype: torch.dtype):
    """The worst-case error of a sum of ``n`` exactly representable terms accumulated in
    ``acc_dtype`` in *any* order (Higham, Accuracy and Stability, Thm 4.1: ``gamma_{n-1}`` times
    the sum of the terms' magnitudes): a tolerance from the arithmetic, not from one CPU's
    rounding (SIMD widths, blocking and thread counts only reorder the sum)."""
    u = unit_roundoff(acc_dtype)
    return (n - 1) * u / (1 - (n - 1) * u) * abs_sum


def assume_interpreter_computes(backend: str, dtype: torch.dtype) -> None:
    """Discard a hypothesis example the Triton interpreter cannot check: its bf16 arithmetic is
    wrong (docs/ARCHITECTURE.md, "Triton's interpreter"); compiled kernels are checked in bf16 on
    a GPU. Discarded examples do not count, so every example that runs checks something."""
    assume(not (backend == "triton" and dtype == torch.bfloat16))


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (B, C, H, W) in another memory layout."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        # Every other element of a wider buffer: no dim is dense.
        big = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if layout == "transposed":
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


def feature_pair(shape, dtype=torch.float32, layout_a="contiguous", layout_b="contiguous", seed=0, noise=0.5):
    """Two correlated feature maps, like an input and its reconstruction."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g, dtype=torch.float64)
    b = a + noise * torch.randn(shape, generator=g, dtype=torch.float64)
    return with_layout(a.to(dtype), layout_a), with_layout(b.to(dtype), layout_b)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in the output"
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


# A small absolute floor, so that gradients that are zero up to rounding (one channel) pass.
ABS_TOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def assert_close_to_ref(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, eager: torch.Tensor | None = None):
    """||out - ref|| <= tol ||ref|| + atol sqrt(n) against the float64 reference; where the same
    computation in eager PyTorch at that dtype is given, also at most 2x its error plus atol."""
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "NaN in the output"
    diff = (out.double() - ref.double()).norm().item()
    floor = ABS_TOL[dtype] * max(1, ref.numel()) ** 0.5
    bound = REL_TOL[dtype] * ref.double().norm().item() + floor
    assert diff <= bound, f"|out - ref| = {diff:.3g} > {bound:.3g} (relative {rel_err(out, ref):.3g}) for {dtype}"
    if eager is not None:
        eager_diff = (eager.double() - ref.double()).norm().item()
        assert diff <= 2 * eager_diff + floor, f"error {diff:.3g} > 2x eager's {eager_diff:.3g} + {floor:.3g}"


def guarded(shape, dtype, guard: int = 64):
    """A NaN-filled buffer and a contiguous view of ``shape`` in its middle: a kernel that writes
    out of bounds leaves a non-NaN in the guard regions, one that skips an element leaves a NaN."""
    n = 1
    for s in shape:
        n *= s
    buf = torch.full((n + 2 * guard,), float("nan"), dtype=dtype)
    return buf, buf[guard:guard + n].view(shape)


def assert_guards_intact(buf: torch.Tensor, guard: int = 64):
    assert torch.isnan(buf[:guard]).all() and torch.isnan(buf[-guard:]).all(), "write outside the output"
    assert not torch.isnan(buf[guard:-guard]).any(), "output element left unwritten"


def write_pngs(folder, n: int, seed: int, size: int):
    """``n`` random RGB PNGs of ``size`` x ``size`` in a new ``folder`` (000.png, 001.png, ...)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def read_rows(out) -> list[dict]:
    """The rows of ``out/scores.csv``."""
    import csv

    with open(out / "scores.csv", newline="") as f:
        return list(csv.DictReader(f))


def tiny_checkpoint(path, size: int, strategy: str = "recon", seed: int = 0, **state):
    """A seeded efficientnet_lite0 (random weights, layers 1 2, top-10) training checkpoint at
    ``path``, with ``state`` stored beside it (``seed``: another model)."""
    import warnings

    from ckaad_fast.model import ModelConfig, save_checkpoint
    from ckaad_fast.training import CKAAD

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights
        model = CKAAD(ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=size, topk=10,
                                  strategy=strategy), weights="none").eval()
    save_checkpoint(path, model, **state)
    return path
