"""The GPU check's comparisons reject what they must, at the sizes the GPU check runs: a zeroed
gradient, a gradient scaled by 1.05, one NaN; and its exit status counts every FAIL and MISS."""
from __future__ import annotations

import math

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.gpu_criteria import (bound, check_close, exit_status, goal_verdict, gradient_condition,
                                     map_condition, normwise_error, beyond_spread)
from ckaad_fast.ops import backend
from ckaad_fast.ops import reference as ref


def _mutants(t: torch.Tensor) -> dict[str, torch.Tensor]:
    nan = t.clone()
    nan.view(-1)[nan.numel() // 2] = float("nan")
    return {"zeroed": torch.zeros_like(t), "scaled by 1.05": t * 1.05, "one NaN": nan}


def _rejects_mutants(out, reference, limit, what):
    check_close(out, reference, limit, what)  # the true output passes...
    for name, bad in _mutants(out).items():  # ...and each mutation fails
        with pytest.raises(AssertionError):
            check_close(bad, reference, limit, f"{what} {name}")


def _cosine_terms(x64, y64, dim):
    """cos and the float64 gradient of 1 - cos(x, y) along ``dim`` with respect to x, in closed
    form (cheaper than autograd at the check's sizes): -(y / (|x||y|) - cos x / |x|^2)."""
    nx, ny = x64.norm(dim=dim, keepdim=True), y64.norm(dim=dim, keepdim=True)
    cos = (x64 * y64).sum(dim, keepdim=True) / (nx * ny)
    return cos, -(y64 / (nx * ny) - cos * x64 / (nx * nx))


def test_reconstruction_loss_gradient_mutations_rejected_at_the_checks_training_size():
    # The GPU check's largest loss case: (32, 256, 64, 64), whose mean-reduced gradient the old
    # bound (REL |ref| + ABS sqrt(n)) let through even when zeroed. The outputs are the op's own
    # (its CPU path).
    import ckaad_fast.ops as ops

    shape = gpu_check.LOSS_SHAPES[0]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).requires_grad_(True)
    y = (x.detach() + 0.3 * torch.randn(shape, generator=g)).requires_grad_(True)
    with backend("torch"):
        (gx,) = torch.autograd.grad(ops.cosine_reconstruction_loss([x], [y]), (x,))
    x64, y64 = x.detach().double().reshape(shape[0], -1), y.detach().double().reshape(shape[0], -1)
    cos, grad = _cosine_terms(x64, y64, 1)  # d/dx of mean_i (1 - cos_i): the rows' gradients / B
    reference = (grad / shape[0]).reshape(shape)
    limit = bound(torch.float32, x[0].numel(), gradient_condition(cos))
    assert limit < 0.01  # far below a 5% change
    _rejects_mutants(gx, reference, limit, "grad inputs")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cosine_map_gradient_mutations_rejected_at_the_checks_size(dtype):
    # A correct kernel's gradient is the float64 one rounded once to the dtype: it passes, and the
    # three mutations of it fail (at the check's (32, 256, 64, 64), C = 256 as at batch 128).
    shape = gpu_check.MAP_SHAPES[1]
    g = torch.Generator().manual_seed(1)
    a = torch.randn(shape, generator=g).to(dtype)
    b = (a.float() + 0.3 * torch.randn(shape, generator=g)).to(dtype)
    cos, grad = _cosine_terms(a.double(), b.double(), 1)
    gout = torch.randn(cos.shape, generator=g, dtype=torch.float64)
    ra = grad * gout  # the upstream gradient per position, broadcast over channels
    limit = bound(dtype, shape[1], gradient_condition(cos))
    _rejects_mutants(ra.to(dtype), ra, limit, "grad a")
    err = (1 - cos).squeeze(1)
    _rejects_mutants(err.float(), err, bound(torch.float32, shape[1], map_condition(cos)), "map")


def test_closed_form_matches_autograd_of_the_reference():
    # The closed form the two tests above use is the reference's gradient (small sizes).
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64).requires_grad_(True)
    b = torch.randn(2, 5, 3, 4, generator=g, dtype=torch.float64)
    (ra,) = torch.autograd.grad(ref.cosine_error_map(a, b).sum(), (a,))
    torch.testing.assert_close(_cosine_terms(a.detach(), b, 1)[1], ra)


def test_energy_gradient_mutations_rejected_at_the_checks_size():
    n = gpu_check.ENERGY_SIZE
    s = 6 * torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    s.requires_grad_(True)
    (grad,) = torch.autograd.grad(ref.energy_hinge_loss(s, True), s)
    for dtype in (torch.bfloat16, torch.float32):
        _rejects_mutants(grad.to(dtype), grad, bound(dtype, 1), f"energy grad {dtype}")


def test_nan_and_shape_errors_fail_and_zero_reference_compares_absolutely():
    ref_t = torch.ones(10, dtype=torch.float64)
    with pytest.raises(AssertionError, match="NaN"):
        normwise_error(torch.full((10,), float("nan")), ref_t, "x")
    with pytest.raises(AssertionError, match="NaN or infinite"):
        normwise_error(torch.full((10,), float("inf")), ref_t, "x")
    with pytest.raises(AssertionError, match="shape"):
        normwise_error(torch.ones(9), ref_t, "x")
    assert normwise_error(torch.zeros(3), torch.zeros(3, dtype=torch.float64), "x") == 0
    with pytest.raises(AssertionError):
        check_close(torch.full((3,), 1e-3), torch.zeros(3, dtype=torch.float64), 1e-6, "x")


def test_bound_follows_the_arithmetic():
    # One rounding of the output plus float32 sums of k terms, times the condition number.
    assert bound(torch.bfloat16, 1) == pytest.approx(2 * 2.0 ** -8 + 8 * 2.0 ** -24)
    assert bound(torch.float32, 10000, 3.0) == pytest.approx(2 * 2.0 ** -24 + 8 * 100 * 2.0 ** -24 * 3)
    assert map_condition(torch.tensor([0.96, 0.96], dtype=torch.float64)) == pytest.approx(24.0)
    assert gradient_condition(torch.tensor([0.0], dtype=torch.float64)) == 1.0
    assert gradient_condition(torch.tensor([0.8], dtype=torch.float64)) == pytest.approx(1 / 0.6)


def test_goals_and_exit_status():
    assert goal_verdict(0.71, 0.70) == "PASS" and goal_verdict(0.69, 0.70) == "MISS"
    assert goal_verdict(0.05, 0.10, at_least=False) == "PASS" and goal_verdict(0.2, 0.10, at_least=False) == "MISS"
    assert goal_verdict(math.nan, 1.0) == "MISS"
    rows = [{"verdict": "PASS"}, {"verdict": "NOGOAL"}]
    assert exit_status(rows) == 0
    for bad in ("FAIL", "MISS"):
        assert exit_status(rows + [{"verdict": bad}]) == 1
    assert beyond_spread([1.0, 1.1, 1.2], [1.5, 1.6, 1.7])
    assert not beyond_spread([1.0, 1.1, 1.6], [1.5, 1.6, 1.7])


def test_a_row_past_the_time_budget_is_a_miss(tmp_path):
    chk = gpu_check.Check(tmp_path, smoke=False, deadline=0.0)
    assert chk.out_of_time("ops", "something")
    assert chk.rows[-1]["verdict"] == "MISS" and exit_status(chk.rows) == 1
    # Streamed to the CSV at once.
    assert "MISS" in (tmp_path / "gpu_check.csv").read_text()
