"""The native CPU kernels (kernels/cpu_kernels.c): how they are built and found, the paths the
property tests do not reach (threads, batch 1 split by positions, NaN, zero vectors), and the
energy Function's gradient bookkeeping (handed over once, scaled, recomputed on a second backward)."""
from __future__ import annotations

import warnings

import pytest
import torch

import ckaad_fast.ops as ops
from ckaad_fast.kernels import native
from ckaad_fast.ops import _backend
from ckaad_fast.ops import reference as ref

from helpers import assert_close_to_ref


def test_the_kernels_build_wherever_there_is_a_compiler():
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine: the PyTorch paths serve (tested with backend 'torch')")
    assert native.library() is not None, native.BUILD_ERROR


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A first use again, with its own cache folder; the process's library comes back after."""
    monkeypatch.setenv("CKAAD_FAST_CACHE_DIR", str(tmp_path))
    saved = native._lib, native._tried, native.BUILD_ERROR, _backend._native_warned
    native._lib, native._tried, native.BUILD_ERROR, _backend._native_warned = None, False, None, False
    yield tmp_path
    native._lib, native._tried, native.BUILD_ERROR, _backend._native_warned = saved


def test_a_build_lands_atomically_in_the_cache_and_is_reused(fresh_build):
    if native.compiler() is None:
        pytest.skip("no C compiler")
    assert native.library() is not None
    (built,) = (fresh_build / "native").glob("cpu_kernels-*.so")
    assert not list((fresh_build / "native").glob(".building-*"))  # nothing half-written left behind
    stamp = built.stat().st_mtime_ns
    native._lib, native._tried = None, False
    assert native.library() is not None and built.stat().st_mtime_ns == stamp  # found, not rebuilt


def test_a_failed_build_falls_back_once_with_a_warning_and_native_says_why(fresh_build, monkeypatch, tmp_path):
    calls = tmp_path / "calls"
    broken = tmp_path / "cc"
    # --version answers (as every compiler does); a build fails.
    broken.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n[ \"$1\" = --version ] && exit 0\n"
                      "echo 'cc: no such luck' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    a, b = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    with pytest.warns(RuntimeWarning, match="native CPU kernels could not be built.*no such luck"):
        first = ops.cosine_error_map(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        second = ops.cosine_error_map(a, b)
    torch.testing.assert_close(first, second)
    with ops.backend("native"), pytest.raises(RuntimeError, match="backend 'native'.*no such luck"):
        ops.cosine_error_map(a, b)
    # Every variant was tried once; a later process remembers the failures instead of compiling again.
    builds = [line for line in calls.read_text().splitlines() if "--version" not in line]
    assert len(builds) == len(native.VARIANTS)
    assert len(list((fresh_build / "native").glob("*.failed"))) == len(native.VARIANTS)
    native._lib, native._tried = None, False
    assert native.library() is None and "no such luck" in native.BUILD_ERROR
    assert len([line for line in calls.read_text().splitlines() if "--version" not in line]) == len(builds)


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def posix_threads_library(tmp_path_factory):
    """The library as a compiler without OpenMP builds it (POSIX threads), built once."""
    import ctypes
    import subprocess

    cc = native.compiler()
    if cc is None:
        pytest.skip("no C compiler")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CKAAD_FAST_CACHE_DIR", str(tmp_path_factory.mktemp("posix")))
        return native._declare(ctypes.CDLL(str(native._build(cc, version, ("-fopenmp-simd",)))))


@pytest.fixture(params=["as built here", "posix threads"])
def threading_build(request, posix_threads_library):
    """The library as built here (OpenMP where the compiler has it), and with POSIX threads."""
    assert native.library() is not None, native.BUILD_ERROR
    saved = native._lib
    if request.param == "posix threads":
        native._lib = posix_threads_library
    yield
    native._lib = saved


@pytest.mark.parametrize("shape,layout", [
    ((2, 64, 64, 64), "nchw"),  # 2^19 elements: two threads, one image each
    ((1, 130, 63, 65), "nchw"),  # batch 1: the positions split between threads; channels not a multiple of 4
    ((2, 64, 64, 64), "rows"),  # channels_last rows split between threads
])
def test_threaded_cosine_map_against_float64(shape, layout, two_threads, threading_build):
    g = torch.Generator().manual_seed(7)
    a = torch.randn(shape, generator=g)
    b = a + 0.5 * torch.randn(shape, generator=g)
    if layout == "rows":
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    assert native.cosine_layout(a, b) == layout
    with ops.backend("native"):
        err = ops.cosine_error_map(a, b)
    assert_close_to_ref(err, ref.cosine_error_map(a.double(), b.double()), torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "rows"])
def test_native_cosine_map_keeps_nan_and_the_eps_rule_of_the_pytorch_path(layout):
    a, b = torch.randn(2, 6, 3, 4), torch.randn(2, 6, 3, 4)
    a[0, 2, 1, 1] = float("nan")
    a[1, :, 2, 3] = 0.0  # a zero vector: cos 0 by max(|a|, eps), the error 1
    b[1, :, 0, 0] = 0.0
    if layout == "rows":
        a, b = a.contiguous(memory_format=torch.channels_last), b.contiguous(memory_format=torch.channels_last)
    with ops.backend("native"):
        got = ops.cosine_error_map(a, b)
    with ops.backend("torch"):
        want = ops.cosine_error_map(a, b)
    assert torch.isnan(got[0, 1, 1]) and torch.isnan(got).sum() == 1
    assert got[1, 2, 3] == 1.0 and got[1, 0, 0] == 1.0
    torch.testing.assert_close(got, want, equal_nan=True)


def _terms(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(6 * torch.randn(n, 1, 5, 7, generator=g)).requires_grad_() for n in (2, 3, 4)]


def _loss(sn, sa, sg):
    with ops.backend("native"):
        return ops.discriminator_loss([sn], [sa], [sg], gamma=0.3)


def _reference_grads(leaves, upstream):
    x = [t.detach().double().requires_grad_() for t in leaves]
    return torch.autograd.grad(ref.discriminator_loss([x[0]], [x[1]], [x[2]], gamma=0.3), x, torch.tensor(upstream).double())


def test_energy_gradients_scaled_handed_over_once_and_recomputed_on_a_second_backward():
    leaves = _terms()
    loss = _loss(*leaves)
    assert type(loss.grad_fn).__name__ == "_NativeEnergyBackward"
    first = torch.autograd.grad(loss, leaves, torch.tensor(1.7), retain_graph=True)
    second = torch.autograd.grad(loss, leaves, torch.tensor(-0.25))  # the kept gradients were handed over
    for got, want in [(first, _reference_grads(leaves, 1.7)), (second, _reference_grads(leaves, -0.25))]:
        for g, w in zip(got, want):
            assert_close_to_ref(g, w, torch.float32)


def test_energy_nan_upstream_reaches_every_element_and_in_place_changes_are_caught():
    leaves = _terms(1)
    (g,) = torch.autograd.grad(_loss(*leaves), leaves[:1], torch.tensor(float("nan")))
    assert torch.isnan(g).all()  # as PyTorch's sign * mask * scale gives
    s = [t.detach().clone().requires_grad_() for t in leaves]
    work = [t * 1.0 for t in s]  # non-leaf inputs that can be changed in place
    loss = _loss(*work)
    with torch.no_grad():
        work[0].add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_energy_without_gradients_writes_none():
    leaves = [t.detach() for t in _terms(2)]
    loss = _loss(*leaves)
    assert loss.grad_fn is None
    want = ref.discriminator_loss([leaves[0].double()], [leaves[1].double()], [leaves[2].double()], gamma=0.3)
    assert_close_to_ref(loss.reshape(1), want.reshape(1), torch.float32)


@pytest.mark.parametrize("term", [0, 1])  # an |s| term and a hinge term
def test_a_nan_score_makes_the_loss_nan_and_its_own_gradient_zero_as_in_pytorch(term):
    leaves = _terms(3)
    with torch.no_grad():
        leaves[term][0, 0, 1, 2] = float("nan")
    results = []
    for backend in ("native", "torch"):
        with ops.backend(backend):
            loss = ops.discriminator_loss([leaves[0]], [leaves[1]], [leaves[2]], gamma=0.3)
            results.append((loss, torch.autograd.grad(loss, leaves)))
    (loss, grads), (want_loss, want_grads) = results
    assert torch.isnan(loss) and torch.isnan(want_loss)
    assert grads[term][0, 0, 1, 2] == 0.0
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("batch,out_size,sigma", [(1, (37, 70), 4.0), (3, (64, 33), 2.0), (2, (40, 40), 0.0)])
def test_threaded_upsample_blur_against_float64(batch, out_size, sigma, two_threads, threading_build):
    # Batch 1 splits output rows between threads; widths off the 32-column register blocks.
    g = torch.Generator().manual_seed(batch)
    maps = [torch.rand(batch, h, w, generator=g) for h, w in [(9, 11), (5, 6), (3, 3)]]
    with ops.backend("native"):
        got = ops.upsample_blur_sum(maps, out_size, sigma=sigma, border="mirror")
    want = ops.upsample_blur_sum([m.double() for m in maps], out_size, sigma=sigma, border="mirror")
    assert_close_to_ref(got, want, torch.float32)


@pytest.mark.parametrize("batch", [1, 3])  # batch 1 splits each sample between threads
def test_threaded_reconstruction_loss_against_float64(batch, two_threads, threading_build):
    g = torch.Generator().manual_seed(batch)
    xs = [torch.randn(batch, 64, 96, 96, generator=g).requires_grad_(), torch.randn(batch, 5, 3, 7, generator=g)]
    ys = [(x.detach() + 0.4 * torch.randn(x.shape, generator=g)).requires_grad_() for x in xs]
    with ops.backend("native"):
        loss = ops.cosine_reconstruction_loss(xs, ys)
        got = torch.autograd.grad(loss, [xs[0], ys[0]])
    x64 = [x.detach().double().requires_grad_() for x in xs]
    y64 = [y.detach().double().requires_grad_() for y in ys]
    want_loss = ref.cosine_reconstruction_loss(x64, y64)
    want = torch.autograd.grad(want_loss, [x64[0], y64[0]])
    assert_close_to_ref(loss.reshape(1), want_loss.reshape(1), torch.float32)
    for a, b in zip(got, want):
        assert_close_to_ref(a, b, torch.float32)
