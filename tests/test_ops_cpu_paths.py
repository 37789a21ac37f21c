"""The CPU paths' two shortcuts: the eager autograd.Function of the energy losses (the op's
values and gradients, and the registered op whenever something traces) and the reused gradient
buffers of the reconstruction loss (never a buffer someone still holds)."""
from __future__ import annotations

import pytest
import torch
from helpers import sum_error_bound, unit_roundoff

import ckaad_fast.ops as ops
from ckaad_fast.ops import _buffers, energy


def _scores(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n, h, scale: (scale * torch.randn(n, 1, h, h + 1, generator=g)).to(dtype).requires_grad_()  # noqa: E731
    sn = [make(3, 5, 1.0), make(3, 2, 1.0)]
    sa = [make(2, 5, 6.0), make(2, 2, 6.0)]
    sg = [make(5, 5, 6.0), make(5, 2, 6.0).transpose(2, 3)]  # one non-contiguous
    with torch.no_grad():
        sa[0][0, 0, 0, 0] = 5.0  # exactly the margin: relu's kink
        sn[1][0, 0, 0, 0] = 0.0  # abs's kink
    return sn, sa, sg


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_eager_energy_path_equals_the_registered_op(dtype, backend):
    sn, sa, sg = _scores(dtype)
    leaves = sn + sa + sg
    with ops.backend(backend):
        fast = ops.discriminator_loss(sn, sa, sg, gamma=0.3, margin=5.0)
        # The native kernels serve float32; other dtypes keep the PyTorch Function.
        native = backend == "native" and dtype == torch.float32
        assert type(fast.grad_fn).__name__ == ("_NativeEnergyBackward" if native else "_EagerEnergyBackward")
        slow = energy._energy_op(leaves, [1.0] * 2 + [0.7] * 2 + [0.3] * 2, [False] * 2 + [True] * 4, 5.0)
    with ops.backend("torch"):  # and the op's own PyTorch path
        slow = energy._energy_op(leaves, [1.0] * 2 + [0.7] * 2 + [0.3] * 2, [False] * 2 + [True] * 4, 5.0)
    assert "ckaad_fast" in type(slow.grad_fn).__name__ or slow.grad_fn is not None
    # Two float32 (float64) formulations of one sum: the op sums relu(m - |s|), the eager path
    # offsets m - min(|s|, m); both within any-order rounding of the terms' magnitudes m + |s|.
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = [1.0] * 2 + [0.7] * 2 + [0.3] * 2
    magnitude = sum(w * (5.0 + s.detach().double().abs().mean().item()) for w, s in zip(weights, leaves))
    bound = sum_error_bound(max(s.numel() for s in leaves) + len(leaves) + 2, magnitude, acc)
    assert abs(fast.double().item() - slow.double().item()) <= bound
    with ops.backend(backend):
        got = torch.autograd.grad(fast, leaves)
    for a, b in zip(got, torch.autograd.grad(slow, leaves)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with ops.backend(backend):
        gen = ops.generator_loss(sg)
    torch.testing.assert_close(gen, sum(s.float().abs().mean() if dtype != torch.float64 else s.abs().mean()
                                        for s in sg).to(gen.dtype), rtol=1e-5, atol=1e-6)


def test_eager_energy_path_gradcheck():
    sn, sa, sg = _scores(torch.float64, seed=3)
    with torch.no_grad():
        sa[0][0, 0, 0, 0] = 4.0  # away from the kinks, where finite differences hold
        sn[1][0, 0, 0, 0] = 0.5
    assert torch.autograd.gradcheck(lambda *t: ops.discriminator_loss(t[:2], t[2:4], t[4:]), sn + sa + sg)


def test_tracing_sees_the_registered_op():
    from torch.fx.experimental.proxy_tensor import make_fx

    s = torch.randn(2, 1, 4, 4)
    graph = make_fx(lambda x: ops.generator_loss([x]))(s)
    assert "ckaad_fast.energy_loss" in str(graph.graph)
    compiled = torch.compile(lambda x: ops.discriminator_loss([x], [x * 2], [x * 3]), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(s), ops.discriminator_loss([s], [s * 2], [s * 3]))


def test_reused_gradient_buffers_never_change_a_gradient_still_held():
    shapes = [(2, 64, 64, 64), (2, 128, 16, 16)]  # 2 MiB and 256 KiB (below the reuse size) per sample set
    g = torch.Generator().manual_seed(0)
    make = lambda grad=True: [torch.randn(*s, generator=g).requires_grad_(grad) for s in shapes]  # noqa: E731
    # Only the reconstructions need a gradient, as in training: one buffer per layer and call.
    xs, ys = make(), make(False)
    kept = torch.autograd.grad(ops.cosine_reconstruction_loss(ys, xs), xs)
    snapshot = [k.clone() for k in kept]
    xs2, ys2 = make(), make(False)
    other = torch.autograd.grad(ops.cosine_reconstruction_loss(ys2, xs2), xs2)
    for k, s in zip(kept, snapshot):
        assert torch.equal(k, s)  # the held gradient was not written over
    assert kept[0].data_ptr() != other[0].data_ptr()
    # Once dropped, its buffer is written again, and the new gradient is right.
    ptr = other[0].data_ptr()
    del other
    third = torch.autograd.grad(ops.cosine_reconstruction_loss(ys2, xs2), xs2)
    assert third[0].data_ptr() == ptr
    expected = torch.autograd.grad(sum((1 - torch.nn.functional.cosine_similarity(
        x.flatten(1), y.flatten(1), dim=1, eps=1e-8)).mean() for x, y in zip(xs2, ys2)), xs2)
    for a, b in zip(third, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    ops.release_buffers()
    assert not _buffers._cache


def test_small_or_non_cpu_buffers_are_not_cached():
    ops.release_buffers()
    t = _buffers.reusable_empty((10, 10), torch.float32, "cpu")
    assert t.shape == (10, 10) and not _buffers._cache


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_long_rows_take_the_chunked_dots_and_match_the_definition(dtype):
    from ckaad_fast.ops import cosine

    g = torch.Generator().manual_seed(1)
    n = cosine._DOT_CHUNK * 2 + 7  # chunks, and a short last one
    x = torch.randn(3, n, generator=g, dtype=torch.float64)
    y = (x + 0.3 * torch.randn(3, n, generator=g, dtype=torch.float64))
    sums = cosine._flat_sums_torch(x.to(dtype), y.to(dtype))
    xr, yr = x.to(dtype).double(), y.to(dtype).double()
    expected = torch.stack([(xr * yr).sum(1), (xr * xr).sum(1), (yr * yr).sum(1)], 1)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert sums.dtype == acc
    # Products of float32 or bfloat16 numbers are exact in float32 only for bfloat16 (8 + 8 bits);
    # a float32 product rounds once more: one u per term on top of the sum's bound.
    magnitude = torch.stack([(xr * yr).abs().sum(1), (xr * xr).sum(1), (yr * yr).sum(1)], 1)
    bound = sum_error_bound(n + 1, magnitude, acc)
    err = (sums.double() - expected).abs()
    assert (err <= bound).all(), f"sum errors {err.max():.3g} above the bound {bound.min():.3g}"
    xs = x.view(3, 1, 1, n).to(dtype).requires_grad_()
    loss = ops.cosine_reconstruction_loss([xs], [y.view(3, 1, 1, n).to(dtype)])
    ref = (1 - torch.nn.functional.cosine_similarity(xr, yr, dim=1, eps=1e-8)).mean()
    # |d cos| <= (rel. error of the dot, against sqrt(a b) by Cauchy-Schwarz) + (half the relative
    # errors of a and b) + a few roundings of the final divide, square roots and mean.
    rel = sum_error_bound(n + 1, 1.0, acc)
    torch.testing.assert_close(loss.double(), ref, rtol=0, atol=2 * rel + 16 * unit_roundoff(acc))
    loss.backward()
    assert xs.grad.dtype == dtype and xs.grad.shape == xs.shape
