"""The pass/fail rules of the GPU check (benchmarks/gpu_check.py), kept apart so that the test
suite can show that they reject what they must (tests/test_gpu_criteria.py).

Comparisons are normwise: ``||out - ref|| / ||ref||`` against a bound derived from the
arithmetic, never inflated by the number of elements, and a NaN or an infinity anywhere fails.

The bound for an output rounded once to a dtype with unit roundoff ``u_out``, computed from sums
of ``k`` products accumulated in float32, whose result is ``kappa`` times more sensitive to those
sums than a plain sum (its condition number: 1 - cos near cos = 1 loses digits), is

    2 u_out + 8 sqrt(k) u_32 kappa

A correctly rounded output is off by at most u_out normwise (2 u_out leaves room for one more
rounding); float32 sums of k terms drift by about sqrt(k) u_32 when the roundings are
independent (8 sqrt(k) leaves room for the few sums a formula combines). A wrong formula, a
zeroed or a 5% scaled gradient is off by far more than any bound here (tests/test_gpu_criteria.py
holds this at the GPU check's sizes).
"""
from __future__ import annotations

import math

import torch

UNIT_ROUNDOFF = {
    torch.float64: 2.0 ** -53,
    torch.float32: 2.0 ** -24,
    torch.float16: 2.0 ** -11,
    torch.bfloat16: 2.0 ** -8,
}

#: Verdicts that make the check's exit status nonzero.
FAILING = ("FAIL", "MISS")


def bound(out_dtype: torch.dtype, k: int, kappa: float = 1.0) -> float:
    """The normwise relative bound of the module docstring."""
    return 2 * UNIT_ROUNDOFF[out_dtype] + 8 * math.sqrt(max(1, k)) * UNIT_ROUNDOFF[torch.float32] * max(1.0, kappa)


def normwise_error(out: torch.Tensor, ref: torch.Tensor, what: str) -> float:
    """``||out - ref|| / ||ref||`` in float64; raises when ``out`` holds a NaN or an infinity, or
    when the shapes differ. A zero reference compares absolutely (the error is ``||out||``)."""
    if tuple(out.shape) != tuple(ref.shape):
        raise AssertionError(f"{what}: shape {tuple(out.shape)}, expected {tuple(ref.shape)}")
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        bad = int((~torch.isfinite(out64)).sum())
        raise AssertionError(f"{what}: {bad} NaN or infinite value(s) in the output")
    if not torch.isfinite(ref64).all():
        raise AssertionError(f"{what}: the reference itself is not finite")
    diff = (out64 - ref64).norm().item()
    scale = ref64.norm().item()
    return diff / scale if scale > 0 else diff


def check_close(out: torch.Tensor, ref: torch.Tensor, limit: float, what: str) -> str:
    """Raise unless ``out`` is within ``limit`` of ``ref`` normwise; return the detail text.
    ``not (err <= limit)`` rather than ``err > limit``, so that a NaN error fails too."""
    err = normwise_error(out, ref, what)
    if not err <= limit:
        raise AssertionError(f"{what}: normwise error {err:.3g} > bound {limit:.3g}")
    return f"{err:.1e} (bound {limit:.1e})"


def map_condition(cos_ref: torch.Tensor) -> float:
    """Condition number of ``1 - cos`` with respect to the float32 sums that give ``cos``:
    ``||cos|| / ||1 - cos||`` (cos from the float64 reference)."""
    c = cos_ref.detach().double()
    err = (1 - c).norm().item()
    return max(1.0, c.norm().item() / err) if err > 0 else 1.0


def gradient_condition(cos_ref: torch.Tensor) -> float:
    """Condition number of a cosine's gradient, ``y/|y| - cos x/|x|`` over ``|x|``: its two terms
    cancel by ``sin(theta)``; the root-mean-square of ``1/sin`` over the samples (float64 cos)."""
    c = cos_ref.detach().double().reshape(-1)
    sin2 = (1 - c * c).clamp_min(1e-12)
    return max(1.0, math.sqrt((1 / sin2).mean().item()))


def goal_verdict(value: float, target: float, at_least: bool = True) -> str:
    """PASS when ``value`` meets ``target`` (at least, or at most), else MISS; NaN misses."""
    met = value >= target if at_least else value <= target
    return "PASS" if met else "MISS"


def beyond_spread(ours: list[float], theirs: list[float]) -> bool:
    """Whether ``ours`` (times) is faster than ``theirs`` beyond the run-to-run spread: our
    slowest repetition is faster than their median, and our median faster than their fastest."""
    ours, theirs = sorted(ours), sorted(theirs)
    return ours[-1] < theirs[len(theirs) // 2] and ours[len(ours) // 2] < theirs[0]


def exit_status(rows: list[dict]) -> int:
    """1 when any row failed or missed its goal (a row skipped for lack of time is a MISS), else 0."""
    return 1 if any(r["verdict"] in FAILING for r in rows) else 0
