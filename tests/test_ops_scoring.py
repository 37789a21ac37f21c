"""anomaly_map, upsample_blur_sum and image_score against the reference pipeline and scipy."""
import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ckaad_fast.ops as ops
from ckaad_fast.kernels import upsample_blur as kub
from ckaad_fast.ops import reference as ref
from ckaad_fast.ops.scoring import bilinear_matrix, gaussian_matrix

from helpers import (
    LAYOUTS,
    assert_close_to_ref,
    assert_guards_intact,
    assume_interpreter_computes,
    feature_pair,
    guarded,
)

BACKENDS = ("triton", "native", "torch")


@pytest.mark.parametrize("border", ["reflect", "mirror"])
@pytest.mark.parametrize("n", [1, 2, 5, 16, 40])
@pytest.mark.parametrize("sigma", [0.0, 0.7, 4.0, 13.0])
def test_gaussian_matrix_is_scipys_filter(border, n, sigma):
    # Includes radius >= n, where the reflection repeats.
    x = np.random.default_rng(n).standard_normal((n, 3))
    expected = scipy.ndimage.gaussian_filter1d(x, sigma, axis=0, mode=border, truncate=4.0) if sigma else x
    np.testing.assert_allclose(gaussian_matrix(n, sigma, 4.0, border) @ x, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_in,n_out", [(1, 5), (4, 1), (3, 3), (7, 16), (16, 7), (64, 256)])
def test_bilinear_matrix_is_torchs_interpolate(n_in, n_out):
    x = torch.randn(1, 1, n_in, 2, dtype=torch.float64)
    expected = F.interpolate(x, size=(n_out, 2), mode="bilinear", align_corners=True)[0, 0]
    torch.testing.assert_close(torch.from_numpy(bilinear_matrix(n_in, n_out)) @ x[0, 0], expected)


layer = st.tuples(st.integers(1, 12), st.integers(1, 9), st.integers(1, 9))


@pytest.mark.parametrize("backend", BACKENDS)
@given(
    batch=st.integers(1, 3),
    layers=st.lists(layer, min_size=1, max_size=4),
    out_size=st.one_of(st.integers(1, 40), st.tuples(st.integers(1, 40), st.integers(1, 40))),
    sigma=st.sampled_from([0.0, 1.0, 4.0]),
    border=st.sampled_from(["reflect", "mirror"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    layout=st.sampled_from(LAYOUTS),
    seed=st.integers(0, 2**16),
)
def test_anomaly_map_matches_reference_pipeline(backend, batch, layers, out_size, sigma, border, dtype, layout, seed):
    assume_interpreter_computes(backend, dtype)
    pairs = [feature_pair((batch, *s), dtype, layout, "contiguous", seed + i) for i, s in enumerate(layers)]
    fs, ft = [p[0] for p in pairs], [p[1] for p in pairs]
    with ops.backend(backend):
        out = ops.anomaly_map(fs, ft, out_size=out_size, sigma=sigma, border=border)
    expected = ref.anomaly_map(fs, ft, out_size=out_size, sigma=sigma, border=border)
    assert out.dtype == torch.float32 and out.shape == expected.shape
    # The maps stay in float32 after the dtype's own rounding of the features.
    assert_close_to_ref(out, expected, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anomaly_map_equals_scipy_gaussian_filter(backend):
    # The reference code's own pipeline, literally: eager cosine, interpolate, scipy per image.
    fs = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    ft = [f + 0.3 * torch.randn_like(f) for f in fs]
    with ops.backend(backend):
        out = ops.anomaly_map(fs, ft, out_size=32, sigma=4)
    total = sum(
        F.interpolate((1 - F.cosine_similarity(a, b)).unsqueeze(1), size=32, mode="bilinear", align_corners=True)
        for a, b in zip(fs, ft)
    )[:, 0].numpy()
    expected = np.stack([scipy.ndimage.gaussian_filter(m, sigma=4) for m in total])
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-5, atol=1e-6)


def test_anomaly_map_realistic_sizes_cpu_path():
    shapes = [(256, 64, 64), (512, 32, 32), (1024, 16, 16)]
    pairs = [feature_pair((2, *s), torch.float32, "contiguous", "contiguous", i) for i, s in enumerate(shapes)]
    fs, ft = [p[0] for p in pairs], [p[1] for p in pairs]
    with ops.backend("torch"):
        out = ops.anomaly_map(fs, ft, out_size=256)
    assert_close_to_ref(out, ref.anomaly_map(fs, ft, out_size=256), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_upsample_blur_gradcheck(backend):
    maps = [torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 2, 2, dtype=torch.float64, requires_grad=True)]
    with ops.backend(backend):
        assert torch.autograd.gradcheck(lambda *m: ops.upsample_blur_sum(m, out_size=(9, 7), sigma=1.5), maps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anomaly_map_gradcheck(backend):
    fs = [torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)]
    ft = [torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)]
    with ops.backend(backend):
        assert torch.autograd.gradcheck(lambda a, b: ops.anomaly_map([a], [b], out_size=8, sigma=1.0), (*fs, *ft))


def test_upsample_blur_kernel_writes_exactly_its_output():
    maps = [torch.randn(2, 5, 7), torch.randn(2, 3, 3)]
    rows = [torch.from_numpy(gaussian_matrix(37, 2.0) @ bilinear_matrix(m.shape[1], 37)).float() for m in maps]
    cols_t = [torch.from_numpy((gaussian_matrix(19, 2.0) @ bilinear_matrix(m.shape[2], 19)).T.copy()).float() for m in maps]
    buf, out = guarded((2, 37, 19), torch.float32)
    kub.upsample_blur_sum(maps, rows, cols_t, 37, 19, out=out)
    assert_guards_intact(buf)
    expected = sum(r @ m @ c for r, m, c in zip(rows, maps, cols_t))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_anomaly_map_nan_stays_in_its_image(backend):
    # The map is a dense linear operator of the error map, so a NaN in an image's features
    # poisons that image's whole map (and score) and no other image.
    fs = [torch.randn(2, 4, 5, 5)]
    ft = [torch.randn(2, 4, 5, 5)]
    fs[0][1, 2, 3, 3] = float("nan")
    with ops.backend(backend):
        out = ops.anomaly_map(fs, ft, out_size=16)
    assert not torch.isnan(out[0]).any() and torch.isnan(out[1]).all()
    assert torch.isnan(ops.image_score(out, 10)).tolist() == [False, True]


@given(
    batch=st.integers(1, 3), h=st.integers(1, 20), w=st.integers(1, 20), data=st.data(), seed=st.integers(0, 2**16)
)
def test_image_score_matches_reference(batch, h, w, data, seed):
    amap = torch.randn(batch, h, w, generator=torch.Generator().manual_seed(seed))
    topk = data.draw(st.one_of(st.none(), st.integers(1, h * w)))
    torch.testing.assert_close(ops.image_score(amap, topk).double(), ref.image_score(amap, topk), rtol=1e-5, atol=1e-6)
    if topk == 1:
        torch.testing.assert_close(ops.image_score(amap, 1), amap.reshape(batch, -1).max(1).values)


@pytest.mark.parametrize("out_size, expected", [
    (5, (5, 5)), (np.int64(7), (7, 7)), (torch.tensor(6), (6, 6)), (np.array(4), (4, 4)),
    ((3, 4), (3, 4)), ([3, 4], (3, 4)), (torch.Size([3, 4]), (3, 4)), (np.array([3, 4]), (3, 4)),
    ((np.int32(2), torch.tensor(3)), (2, 3)),
])
def test_out_size_forms_users_pass(out_size, expected):
    # img.shape[-1], a NumPy int from a config, a 0-d tensor: all mean the same size.
    amap = ops.anomaly_map([torch.randn(1, 2, 3, 3)], [torch.randn(1, 2, 3, 3)], out_size=out_size)
    assert tuple(amap.shape[1:]) == expected


@pytest.mark.parametrize("out_size", [True, 2.5, (1, 2, 3), "ab", np.array([3]), np.array(2.0),
                                      torch.tensor([3, 4]), None, (True, 3), np.array([[1, 2]])])
def test_out_size_rejects_what_is_not_a_size(out_size):
    f = [torch.randn(1, 2, 3, 3)]
    with pytest.raises(ValueError, match="out_size must be an int or an \\(h, w\\) pair of ints"):
        ops.anomaly_map(f, f, out_size=out_size)


def test_scoring_bad_input():
    f = [torch.randn(2, 3, 4, 4)]
    with pytest.raises(ValueError, match="fs_list is empty"):
        ops.anomaly_map([], [])
    with pytest.raises(ValueError, match="one tensor per layer each, got 1 and 2"):
        ops.anomaly_map(f, f + f)
    with pytest.raises(ValueError, match=r"fs_list\[0\] and ft_list\[0\] must have the same shape"):
        ops.anomaly_map(f, [torch.randn(2, 3, 4, 5)])
    with pytest.raises(ValueError, match=r"every tensor in fs_list must have the same batch size, got \[2, 3\]"):
        ops.anomaly_map(f + [torch.randn(3, 3, 2, 2)], f + [torch.randn(3, 3, 2, 2)])
    with pytest.raises(ValueError, match="out_size must be >= 1"):
        ops.anomaly_map(f, f, out_size=0)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        ops.anomaly_map(f, f, sigma=-1)
    with pytest.raises(ValueError, match="border must be one of"):
        ops.anomaly_map(f, f, border="wrap")
    with pytest.raises(TypeError, match=r"fs_list\[0\] must be float32"):
        ops.anomaly_map([f[0].int()], [f[0].int()])
    with pytest.raises(ValueError, match=r"topk must be an int in \[1, H\*W = 16\]"):
        ops.image_score(torch.randn(2, 4, 4), 17)
    with pytest.raises(ValueError, match="topk must be"):
        ops.image_score(torch.randn(2, 4, 4), 0)
    with pytest.raises(ValueError, match=r"amap must be \(B, H, W\)"):
        ops.image_score(torch.randn(16), 1)


def test_inputs_the_readme_promises_to_refuse():
    """Mixed layers, empty batches, bad numbers, wrong dtypes and devices, unbounded sizes: a
    ValueError or TypeError naming the argument, before anything runs."""
    f = [torch.randn(2, 4, 4, 4), torch.randn(2, 8, 2, 2)]
    mixed = [f[0], f[1].double()]
    with pytest.raises(ValueError, match="every layer in fs_list must share one dtype"):
        ops.anomaly_map(mixed, mixed, out_size=8)
    empty = torch.randn(0, 4, 4, 4)
    with pytest.raises(ValueError, match=r"fs_list\[0\] is empty"):
        ops.anomaly_map([empty], [empty], out_size=8)
    with pytest.raises(ValueError, match=r"inputs\[0\] is empty"):
        ops.cosine_reconstruction_loss([empty], [empty])
    for bad in (-1.0, float("nan"), True):
        with pytest.raises(ValueError, match="eps must be a finite number"):
            ops.cosine_error_map(f[0], f[0], eps=bad)
        with pytest.raises(ValueError, match="margin must be a finite number"):
            ops.energy_hinge_loss(torch.randn(3), True, margin=bad)
        with pytest.raises(ValueError, match="sigma must be a finite number"):
            ops.anomaly_map(f, f, out_size=8, sigma=bad)
    with pytest.raises(ValueError, match="margin must be a finite number"):
        ops.discriminator_loss([torch.randn(3)], [torch.randn(3)], [torch.randn(3)], margin=float("nan"))
    # NumPy numbers are numbers.
    np_map = ops.anomaly_map(f, f, out_size=np.int64(8), sigma=np.float32(1.0))
    torch.testing.assert_close(np_map, ops.anomaly_map(f, f, out_size=8, sigma=1.0))
    torch.testing.assert_close(ops.image_score(np_map, np.int64(5)), ops.image_score(np_map, 5))
    with pytest.raises(ValueError, match="topk must be"):
        ops.image_score(np_map, True)
    for m in ([torch.ones(2, 4, 4, dtype=torch.int32)], [torch.zeros(2, 4, 4, dtype=torch.bool)],
              [torch.zeros(2, 4, 4, dtype=torch.complex64)]):
        with pytest.raises(TypeError, match=r"maps\[0\] must be float32"):
            ops.upsample_blur_sum(m, out_size=8)
    with pytest.raises(ValueError, match="every layer in maps must share one dtype and device"):
        ops.upsample_blur_sum([torch.rand(2, 4, 4), torch.rand(2, 4, 4, device="meta")], out_size=8)
    with pytest.raises(ValueError, match="out_size must be at most"):
        ops.anomaly_map(f, f, out_size=100_000)
    with pytest.raises(ValueError, match="too large"):
        ops.anomaly_map(f, f, out_size=64, sigma=1e9)
    with pytest.raises(ValueError, match="amap must be"):
        ops.image_score(torch.randn(0, 4, 4), 1)


@pytest.mark.parametrize("n, k", [(10_007, 5), (4_000, 1), (9_000, 250), (4_096, 100)])
def test_image_score_of_a_huge_map_takes_top_k_by_chunks_with_the_same_values(monkeypatch, n, k):
    # Maps over TOPK_CHUNK values take the top-k of each chunk's top-k (torch.topk of one huge row
    # needs 16 bytes a value of workspace: 2.2 GB at 144 megapixels): the same k values, so the
    # same mean up to the order of the sum. Here with small chunks, odd sizes and a remainder.
    import ckaad_fast.ops.scoring as scoring

    monkeypatch.setattr(scoring, "TOPK_CHUNK", 1000)
    g = torch.Generator().manual_seed(n + k)
    amap = torch.rand(3, 1, n, generator=g, dtype=torch.float64)
    amap[0, 0] = torch.sort(amap[0, 0]).values  # all k largest in the last chunks: none may be dropped
    expected = torch.topk(amap.reshape(3, -1), k, dim=1).values.mean(1)
    torch.testing.assert_close(scoring.image_score(amap, k), expected, rtol=k * 2**-52, atol=0)
