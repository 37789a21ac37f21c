"""Hinge energy losses against their float64 references."""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ckaad_fast.ops as ops
from ckaad_fast.kernels import energy as kenergy
from ckaad_fast.ops import reference as ref

from helpers import (
    DTYPES,
    LAYOUTS,
    assert_close_to_ref,
    assert_guards_intact,
    assume_interpreter_computes,
    guarded,
    with_layout,
)

BACKENDS = ("triton", "native", "torch")


def scores(shape, dtype, layout, seed, scale=6.0):
    g = torch.Generator().manual_seed(seed)
    s = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    return with_layout(s.to(dtype), layout)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    shape=st.tuples(st.integers(1, 4), st.just(1), st.integers(1, 17), st.integers(1, 19)),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    high=st.booleans(),
    margin=st.sampled_from([5.0, 1.0, 0.0]),
    seed=st.integers(0, 2**16),
)
def test_energy_loss_and_gradient(backend, shape, dtype, layout, high, margin, seed):
    assume_interpreter_computes(backend, dtype)
    s = scores(shape, dtype, layout, seed).requires_grad_(True)
    g = torch.tensor(1.7)
    with ops.backend(backend):
        loss = ops.energy_hinge_loss(s, high, margin)
        (grad,) = torch.autograd.grad(loss, s, g)
    s64 = s.detach().double().requires_grad_(True)
    ref_loss = ref.energy_hinge_loss(s64, high, margin)
    (ref_grad,) = torch.autograd.grad(ref_loss, s64, g.double())
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert_close_to_ref(loss.reshape(1), ref_loss.reshape(1), torch.float32 if dtype == torch.float32 else dtype)
    assert grad.shape == s.shape and grad.dtype == dtype and grad.stride() == torch.empty_like(s).stride()
    assert_close_to_ref(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_energy_gradcheck(backend):
    # Values away from the kinks at 0 and at the margin, where finite differences are undefined.
    s = torch.tensor([[-7.0, -3.0, -0.5], [0.7, 2.5, 9.0]], dtype=torch.float64).requires_grad_(True)
    with ops.backend(backend):
        for high in (False, True):
            assert torch.autograd.gradcheck(lambda x: ops.energy_hinge_loss(x, high), (s,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_discriminator_and_generator_losses(backend):
    layers = [(2, 1, 8, 8), (2, 1, 4, 4)]
    sn = [scores(s, torch.float32, "contiguous", i).requires_grad_(True) for i, s in enumerate(layers)]
    sa = [scores((3, *s[1:]), torch.float32, "channels_last", 10 + i).requires_grad_(True) for i, s in enumerate(layers)]
    sg = [scores(s, torch.float32, "sliced", 20 + i).requires_grad_(True) for i, s in enumerate(layers)]
    with ops.backend(backend):
        d = ops.discriminator_loss(sn, sa, sg, gamma=0.3, margin=4.0)
        gd = torch.autograd.grad(d, sn + sa + sg)
        gl = ops.generator_loss(sg)
    d64 = [[t.detach().double().requires_grad_(True) for t in group] for group in (sn, sa, sg)]
    ref_d = ref.discriminator_loss(*d64, gamma=0.3, margin=4.0)
    ref_gd = torch.autograd.grad(ref_d, d64[0] + d64[1] + d64[2])
    assert abs(d.item() - ref_d.item()) < 1e-5
    assert abs(gl.item() - ref.generator_loss(sg).item()) < 1e-5
    for a, b in zip(gd, ref_gd):
        assert_close_to_ref(a, b, torch.float32)


def test_energy_backward_kernel_writes_exactly_its_output():
    s = torch.randn(40000) * 6
    buf, grad = guarded((40000,), torch.float32)
    kenergy.energy_backward(s, torch.tensor(0.5), 5.0, True, grad=grad)
    assert_guards_intact(buf)
    expected = torch.where(s.abs() < 5, -torch.sign(s), 0) * 0.5
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_energy_nan_propagates(backend):
    s = torch.randn(2, 1, 4, 4)
    s[0, 0, 1, 1] = float("nan")
    with ops.backend(backend):
        for high in (False, True):
            assert torch.isnan(ops.energy_hinge_loss(s, high))
            # The gradient follows autograd through abs and relu: 0 at the NaN, finite elsewhere.
            x = s.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(ops.energy_hinge_loss(x, high), x)
            y = s.clone().requires_grad_(True)
            e = y.abs()
            (expected,) = torch.autograd.grad((torch.relu(5.0 - e) if high else e).mean(), y)
            torch.testing.assert_close(grad, expected)


def test_energy_bad_input():
    with pytest.raises(TypeError, match="scores must be float32"):
        ops.energy_hinge_loss(torch.ones(3, dtype=torch.int64), True)
    with pytest.raises(ValueError, match="scores is empty"):
        ops.energy_hinge_loss(torch.ones(0, 1), True)
    s = [torch.randn(2, 1, 4, 4)]
    with pytest.raises(ValueError, match="s_normal, s_anomalous and s_generated must have one tensor per layer each, got 1, 2 and 1"):
        ops.discriminator_loss(s, s + s, s)
    with pytest.raises(ValueError, match="s_generated is empty"):
        ops.generator_loss([])
    with pytest.raises(ValueError, match="gamma must be a finite number >= 0 and <= 1"):
        ops.discriminator_loss(s, s, s, gamma=1.5)
