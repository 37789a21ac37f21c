"""cosine_error_map and cosine_reconstruction_loss against their float64 references."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ckaad_fast.ops as ops
from ckaad_fast.kernels import cosine as kcos
from ckaad_fast.ops import reference as ref

from helpers import (
    DTYPES,
    LAYOUTS,
    assert_close_to_ref,
    assert_guards_intact,
    assume_interpreter_computes,
    feature_pair,
    guarded,
)

BACKENDS = ("triton", "native", "torch")


def _skip_interpreted_bf16(backend, dtype):
    if backend == "triton" and dtype == torch.bfloat16:
        pytest.skip("bf16 arithmetic is wrong in Triton's interpreter (docs/ARCHITECTURE.md, section Triton's interpreter)")


shapes = st.tuples(st.integers(1, 3), st.integers(1, 40), st.integers(1, 9), st.integers(1, 11))


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    shape=shapes,
    dtype=st.sampled_from(DTYPES),
    layout_a=st.sampled_from(LAYOUTS),
    layout_b=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_error_map_matches_reference(backend, shape, dtype, layout_a, layout_b, seed):
    assume_interpreter_computes(backend, dtype)
    a, b = feature_pair(shape, dtype, layout_a, layout_b, seed)
    with ops.backend(backend):
        out = ops.cosine_error_map(a, b)
    assert out.dtype == dtype and out.shape == (shape[0], shape[2], shape[3])
    eager = 1 - F.cosine_similarity(a, b, dim=1)
    assert_close_to_ref(out, ref.cosine_error_map(a, b), dtype, eager=eager)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    shape=st.tuples(st.integers(1, 3), st.integers(1, 24), st.integers(1, 7), st.integers(1, 9)),
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_error_map_gradients_match_reference_autograd(backend, shape, dtype, layout, seed):
    assume_interpreter_computes(backend, dtype)
    a, b = feature_pair(shape, dtype, layout, "contiguous", seed)
    g = torch.randn(shape[0], shape[2], shape[3], generator=torch.Generator().manual_seed(seed + 1))
    a.requires_grad_(True)
    b.requires_grad_(True)
    with ops.backend(backend):
        ga, gb = torch.autograd.grad(ops.cosine_error_map(a, b), (a, b), g.to(dtype))
    a64, b64 = a.detach().double().requires_grad_(True), b.detach().double().requires_grad_(True)
    ra, rb = torch.autograd.grad(ref.cosine_error_map(a64, b64), (a64, b64), g.double())
    # The gradient comes back in the input's layout where it has one (contiguous, channels_last,
    # transposed), as autograd's own ops return it (empty_like's preserve_format), for every layout.
    assert ga.dtype == dtype and gb.dtype == dtype
    assert ga.stride() == torch.empty_like(a).stride() and gb.stride() == torch.empty_like(b).stride()
    assert_close_to_ref(ga, ra, dtype)
    assert_close_to_ref(gb, rb, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_map_gradcheck(backend):
    # Small: gradcheck runs the op twice per input element, each a kernel launch in the interpreter.
    a, b = feature_pair((2, 3, 2, 3), torch.float64, "channels_last", "sliced", seed=3)
    a.requires_grad_(True)
    b.requires_grad_(True)
    with ops.backend(backend):
        assert torch.autograd.gradcheck(lambda x, y: ops.cosine_error_map(x, y), (a, b))


def test_error_map_realistic_size_cpu_path():
    # WideResNet50 layer 1 at 256 px: 256 x 64 x 64, at batch 2.
    a, b = feature_pair((2, 256, 64, 64), torch.float32, "contiguous", "channels_last", seed=1)
    with ops.backend("torch"):
        out = ops.cosine_error_map(a, b)
    assert_close_to_ref(out, ref.cosine_error_map(a, b), torch.float32)


def test_error_map_kernel_writes_exactly_its_output():
    a, b = feature_pair((2, 7, 5, 13), torch.float32, "channels_last", "contiguous", seed=2)
    err_buf, err = guarded((2, 5, 13), torch.float32)
    stats_buf, stats = guarded((3, 2, 5, 13), torch.float32)
    kcos.cosine_map_forward(a, b, 1e-8, torch.float32, err=err, stats=stats)
    assert_guards_intact(err_buf)
    assert_guards_intact(stats_buf)
    assert_close_to_ref(err, ref.cosine_error_map(a, b), torch.float32)

    g = torch.randn(2, 5, 13)
    ga_buf, ga = guarded(a.shape, torch.float32)
    gb_buf, gb = guarded(b.shape, torch.float32)
    kcos.cosine_map_backward(a, b, g, stats, 1e-8, grad_a=ga, grad_b=gb)
    assert_guards_intact(ga_buf)
    assert_guards_intact(gb_buf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_map_nan_stays_where_it_is(backend):
    a, b = feature_pair((2, 6, 4, 5), torch.float32, seed=4)
    a[1, 3, 2, 1] = float("nan")
    with ops.backend(backend):
        out = ops.cosine_error_map(a, b)
    nan = torch.isnan(out)
    assert nan[1, 2, 1] and nan.sum() == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_error_map_zero_vectors_follow_torch_eps_clamp(backend):
    a, b = feature_pair((1, 4, 2, 3), torch.float32, seed=5)
    a[0, :, 0, 0] = 0
    b[0, :, 1, 2] = 0
    with ops.backend(backend):
        out = ops.cosine_error_map(a, b)
    torch.testing.assert_close(out, 1 - F.cosine_similarity(a, b, dim=1), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Reconstruction loss
# ----------------------------------------------------------------------------------------------
layer_shapes = st.lists(st.tuples(st.integers(1, 24), st.integers(1, 9), st.integers(1, 9)), min_size=1, max_size=3)


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    batch=st.integers(1, 3),
    layers=layer_shapes,
    dtype=st.sampled_from(DTYPES),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_reconstruction_loss_and_gradients(backend, batch, layers, dtype, layout, seed):
    assume_interpreter_computes(backend, dtype)
    pairs = [feature_pair((batch, *s), dtype, layout, "contiguous", seed + i) for i, s in enumerate(layers)]
    xs = [p[0].requires_grad_(True) for p in pairs]
    ys = [p[1].requires_grad_(True) for p in pairs]
    with ops.backend(backend):
        loss = ops.cosine_reconstruction_loss(xs, ys)
        grads = torch.autograd.grad(loss, xs + ys)
    xs64 = [x.detach().double().requires_grad_(True) for x in xs]
    ys64 = [y.detach().double().requires_grad_(True) for y in ys]
    ref_loss = ref.cosine_reconstruction_loss(xs64, ys64)
    ref_grads = torch.autograd.grad(ref_loss, xs64 + ys64)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(loss.item() - ref_loss.item()) <= 1e-5 * max(1.0, abs(ref_loss.item())) * (1 if dtype == torch.float32 else 1000)
    for g, r, t in zip(grads, ref_grads, xs + ys):
        assert g.shape == t.shape and g.dtype == dtype
        assert_close_to_ref(g, r, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reconstruction_loss_gradcheck(backend):
    xs = [feature_pair((2, 2, 3, 2), torch.float64, "channels_last", seed=i)[0].requires_grad_(True) for i in range(2)]
    ys = [feature_pair((2, 2, 3, 2), torch.float64, "sliced", seed=9 + i)[1].requires_grad_(True) for i in range(2)]
    with ops.backend(backend):
        assert torch.autograd.gradcheck(lambda *t: ops.cosine_reconstruction_loss(t[:2], t[2:]), (*xs, *ys))


def test_reconstruction_loss_flattens_like_the_reference_code():
    # The reference code flattens with .view(B, -1) and uses nn.CosineSimilarity(); a layout
    # change must not change the result, since both operands are permuted alike.
    x, y = feature_pair((3, 8, 5, 6), torch.float32, seed=7)
    expected = torch.mean(1 - torch.nn.CosineSimilarity()(y.view(3, -1), x.view(3, -1)))
    cl = torch.channels_last
    got = ops.cosine_reconstruction_loss([x.contiguous(memory_format=cl)], [y.contiguous(memory_format=cl)])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_flat_backward_kernel_writes_exactly_its_output():
    a = torch.randn(3, 10001)
    b = torch.randn(3, 10001)
    coef = torch.randn(3, 3)
    ga_buf, ga = guarded((3, 10001), torch.float32)
    gb_buf, gb = guarded((3, 10001), torch.float32)
    kcos.flat_cosine_backward(a, b, coef, grad_a=ga, grad_b=gb)
    assert_guards_intact(ga_buf)
    assert_guards_intact(gb_buf)
    torch.testing.assert_close(ga, coef[:, :1] * b + coef[:, 1:2] * a)


# ----------------------------------------------------------------------------------------------
# Bad input: errors that name the argument, before any kernel runs
# ----------------------------------------------------------------------------------------------
def test_error_map_bad_input():
    a = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"a and b must have the same shape.*\(2, 3, 4, 5\).*\(2, 3, 4, 6\)"):
        ops.cosine_error_map(a, torch.randn(2, 3, 4, 6))
    with pytest.raises(ValueError, match=r"a must have 4 dims"):
        ops.cosine_error_map(a[0], a[0])
    with pytest.raises(TypeError, match=r"a and b must have the same dtype"):
        ops.cosine_error_map(a, a.half())
    with pytest.raises(TypeError, match=r"a must be float32"):
        ops.cosine_error_map(a.long(), a.long())


def test_reconstruction_loss_bad_input():
    a = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"inputs is empty"):
        ops.cosine_reconstruction_loss([], [])
    with pytest.raises(ValueError, match=r"one tensor per layer each, got 2 and 1"):
        ops.cosine_reconstruction_loss([a, a], [a])
    with pytest.raises(ValueError, match=r"inputs\[0\] and outputs\[0\] must have the same shape"):
        ops.cosine_reconstruction_loss([a], [a[:1]])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reconstruction_loss_gradient_for_the_outputs_only(backend):
    # Training: the backbone's features need no gradient, and none is computed for them.
    xs = [feature_pair((2, 6, 5, 3), torch.float32, seed=i)[0] for i in range(2)]
    ys = [feature_pair((2, 6, 5, 3), torch.float32, seed=i)[1].requires_grad_(True) for i in range(2)]
    with ops.backend(backend):
        grads = torch.autograd.grad(ops.cosine_reconstruction_loss(xs, ys), ys)
    ys64 = [y.detach().double().requires_grad_(True) for y in ys]
    expected = torch.autograd.grad(ref.cosine_reconstruction_loss(xs, ys64), ys64)
    for g, e in zip(grads, expected):
        assert_close_to_ref(g, e, torch.float32)


def test_flat_backward_kernel_skips_the_gradient_not_needed():
    a, b, coef = torch.randn(2, 3000), torch.randn(2, 3000), torch.randn(2, 3)
    gb_buf, gb = guarded((2, 3000), torch.float32)
    ga, gb = kcos.flat_cosine_backward(a, b, coef, grad_b=gb, need_a=False)
    assert ga is None
    assert_guards_intact(gb_buf)
    torch.testing.assert_close(gb, coef[:, :1] * a + coef[:, 2:3] * b)
