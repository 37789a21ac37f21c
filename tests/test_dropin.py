"""The drop-ins against faithful reimplementations of each original's published semantics.

Each ``_original_*`` below is written from the original's description (its signature, the order of
its operations, its dtypes and shapes), with eager PyTorch, NumPy and scipy, one image at a time
where the original takes one image at a time.
"""
import enum

import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ckaad_fast.ops as ops
from ckaad_fast import dropin

from helpers import assert_close_to_ref, feature_pair


# --------------------------------------------------------------------------------------------
# The originals, reimplemented from their description
# --------------------------------------------------------------------------------------------
def _upsampled_error(fs, ft, size):
    """1 - cos over channels, then bilinear upsampling with align_corners=True: (B, 1, H, W)."""
    err = (1 - F.cosine_similarity(fs, ft)).unsqueeze(1)
    return F.interpolate(err, size=size, mode="bilinear", align_corners=True)


def _original_rd4ad(fs_list, ft_list, out_size, amap_mode):
    """RD4AD / RD++ / ReContrast: one image; float64 NumPy accumulator from ones ('mul') or zeros
    (anything else); each layer's map is image 0's (H, W) map taken to NumPy."""
    size = out_size if isinstance(out_size, tuple) else (out_size, out_size)
    acc = np.ones(size) if amap_mode == "mul" else np.zeros(size)
    a_map_list = []
    for fs, ft in zip(fs_list, ft_list):
        a_map = _upsampled_error(fs, ft, size)[0, 0].cpu().detach().numpy()
        a_map_list.append(a_map)
        if amap_mode == "mul":
            acc *= a_map
        else:
            acc += a_map
    return acc, a_map_list


def _original_ckaad(fs_list, ft_list, out_size, amap_mode):
    """CKAAD reference: a float32 torch accumulator (B, 1, H, W) from ones ('mul') or zeros, in-place
    product, maximum or sum, then scipy's gaussian_filter(sigma=4) of each (1, H, W) image,
    stacked to (B, H, W)."""
    batch = fs_list[0].shape[0]
    acc = (torch.ones if amap_mode == "mul" else torch.zeros)([batch, 1, out_size, out_size])
    for fs, ft in zip(fs_list, ft_list):
        a_map = _upsampled_error(fs, ft, out_size)
        if amap_mode == "mul":
            acc *= a_map
        elif amap_mode == "max":
            acc = torch.max(acc, a_map)
        else:
            acc += a_map
    acc = acc.numpy()
    return np.vstack([scipy.ndimage.gaussian_filter(acc[i], sigma=4) for i in range(len(acc))])


def _original_anomalib(student, teacher, image_size, sigma, mode):
    """anomalib RD: a float32 accumulator (B, 1, H, W), then a full 2-D Gaussian kernel (outer
    product of normalised 1-D taps, size 2*int(4 sigma + 0.5) + 1), F.pad 'reflect', conv2d."""
    acc = (torch.ones if mode == "multiply" else torch.zeros)([student[0].shape[0], 1, *image_size])
    for s, t in zip(student, teacher):
        d = _upsampled_error(s, t, image_size)
        acc = acc * d if mode == "multiply" else acc + d
    k = 2 * int(4.0 * sigma + 0.5) + 1
    x = torch.arange(k, dtype=torch.float32) - k // 2
    g = torch.exp(-(x**2) / (2 * float(sigma) ** 2))
    g = g / g.sum()
    kernel = torch.outer(g, g)
    kernel = (kernel / kernel.sum()).view(1, 1, k, k)
    r = k // 2
    return F.conv2d(F.pad(acc, (r, r, r, r), mode="reflect"), kernel)


def _original_rd4ad_loss(a, b):
    return sum(torch.mean(1 - F.cosine_similarity(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1))) for x, y in zip(a, b))


def _original_region_cosine(a, b):
    return sum(1 - F.cosine_similarity(x.detach(), y).mean() for x, y in zip(a, b))


def _original_global_cosine_hm(a, b, alpha, factor):
    """ReContrast's hard-mined loss: the flattened loss on detached encoder maps; a hook on the
    decoder maps multiplies the gradient by ``factor`` where the per-position error is below
    mean + alpha * std."""
    loss = 0
    for x, y in zip(a, b):
        x = x.detach()
        with torch.no_grad():
            dist = (1 - F.cosine_similarity(x, y)).unsqueeze(1)
            thresh = dist.mean() + alpha * dist.reshape(-1).std()
        loss = loss + torch.mean(1 - F.cosine_similarity(x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)))
        easy = (dist < thresh).expand_as(y)
        y.register_hook(lambda g, easy=easy: torch.where(easy, g * factor, g))
    return loss


def _features(batch, layers, seed, dtype=torch.float32):
    pairs = [feature_pair((batch, *s), dtype, seed=seed + i) for i, s in enumerate(layers)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _image(xs, i):
    return [x[i:i + 1] for x in xs]


layer = st.tuples(st.integers(1, 8), st.integers(1, 8), st.integers(1, 8))
layers_st = st.lists(layer, min_size=1, max_size=4)
FOUR_LAYERS = [(4, 8, 8), (6, 4, 4), (8, 2, 2), (3, 1, 1)]


# --------------------------------------------------------------------------------------------
# RD4AD, RD++, ReContrast
# --------------------------------------------------------------------------------------------
@given(
    batch=st.integers(1, 3),
    layers=layers_st,
    out_size=st.one_of(st.integers(1, 40), st.tuples(st.integers(1, 40), st.integers(1, 40))),
    amap_mode=st.sampled_from(["mul", "a", "add", "acc"]),
    seed=st.integers(0, 2**16),
)
def test_rd4ad_equals_original_per_image(batch, layers, out_size, amap_mode, seed):
    fs, ft = _features(batch, layers, seed)
    amap, a_maps = dropin.rd4ad_cal_anomaly_map(fs, ft, out_size, amap_mode)
    hw = out_size if isinstance(out_size, tuple) else (out_size, out_size)
    lead = () if batch == 1 else (batch,)
    assert amap.dtype == np.float64 and amap.shape == (*lead, *hw)
    assert len(a_maps) == len(layers) and all(m.dtype == np.float32 and m.shape == (*lead, *hw) for m in a_maps)
    for i in range(batch):
        exp, exp_list = _original_rd4ad(_image(fs, i), _image(ft, i), out_size, amap_mode)
        got, got_list = (amap, a_maps) if batch == 1 else (amap[i], [m[i] for m in a_maps])
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
        for g, e in zip(got_list, exp_list):
            np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
    # As in the original, the map is the float64 product (sum) of the returned layer maps.
    again = np.ones(hw) if amap_mode == "mul" else np.zeros(hw)
    for m in a_maps:
        again = again * m if amap_mode == "mul" else again + m
    assert np.array_equal(again, amap)


def test_rd4ad_batch_of_one_and_realistic_size():
    fs, ft = _features(1, [(32, 56, 56), (64, 28, 28), (128, 14, 14)], 3)
    for mode in ("mul", "a"):
        amap, a_maps = dropin.rd4ad_cal_anomaly_map(fs, ft, 224, mode)
        exp, exp_list = _original_rd4ad(fs, ft, 224, mode)
        assert amap.shape == (224, 224) and [m.shape for m in a_maps] == [(224, 224)] * 3
        np.testing.assert_allclose(amap, exp, rtol=1e-5, atol=1e-7)
    # The default out_size is the originals' 224.
    assert dropin.rd4ad_cal_anomaly_map(fs, ft)[0].shape == (224, 224)


@pytest.mark.parametrize("amap_mode", ["mul", "a"])
@pytest.mark.parametrize("batch", [1, 2])
def test_rd4ad_sigma_does_the_callers_scipy_blur(amap_mode, batch):
    fs, ft = _features(batch, FOUR_LAYERS, 7)
    amap, a_maps = dropin.rd4ad_cal_anomaly_map(fs, ft, 30, amap_mode, sigma=4)
    plain, plain_list = dropin.rd4ad_cal_anomaly_map(fs, ft, 30, amap_mode)
    assert amap.dtype == np.float64 and amap.shape == plain.shape
    expected = scipy.ndimage.gaussian_filter(plain, sigma=4) if batch == 1 else np.stack(
        [scipy.ndimage.gaussian_filter(m, sigma=4) for m in plain]
    )
    np.testing.assert_allclose(amap, expected, rtol=1e-5, atol=1e-7)
    assert all(np.array_equal(a, b) for a, b in zip(a_maps, plain_list))


@pytest.mark.parametrize(
    "dtype,list_dtype",
    [(torch.float16, np.float16), (torch.bfloat16, np.float32), (torch.float64, np.float64)],
)
def test_rd4ad_dtypes(dtype, list_dtype):
    fs, ft = _features(1, [(8, 4, 4), (4, 2, 2)], 1, dtype)
    amap, a_maps = dropin.rd4ad_cal_anomaly_map(fs, ft, 16, "mul")
    assert amap.dtype == np.float64 and all(m.dtype == list_dtype for m in a_maps)
    # Against the original on the same (rounded) features in float32.
    exp, _ = _original_rd4ad([f.float() for f in fs], [f.float() for f in ft], 16, "mul")
    np.testing.assert_allclose(amap, exp, rtol=2e-3 if dtype != torch.float64 else 1e-5, atol=1e-4)


# --------------------------------------------------------------------------------------------
# CKAAD reference code
# --------------------------------------------------------------------------------------------
@given(
    batch=st.integers(1, 3),
    layers=layers_st,
    out_size=st.integers(1, 40),
    amap_mode=st.sampled_from(["mul", "add", "a", "max"]),
    seed=st.integers(0, 2**16),
)
def test_ckaad_equals_original(batch, layers, out_size, amap_mode, seed):
    fs, ft = _features(batch, layers, seed)
    out = dropin.ckaad_cal_anomaly_map(fs, ft, out_size, amap_mode)
    expected = _original_ckaad(fs, ft, out_size, amap_mode)
    assert isinstance(out, np.ndarray) and out.dtype == expected.dtype == np.float32
    assert out.shape == expected.shape == (batch, out_size, out_size)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)


def test_ckaad_realistic_size_and_four_layers():
    fs, ft = _features(2, [(32, 56, 56), (64, 28, 28), (128, 14, 14), (16, 7, 7)], 5)
    for mode in ("mul", "add"):
        np.testing.assert_allclose(
            dropin.ckaad_cal_anomaly_map(fs, ft, 224, mode), _original_ckaad(fs, ft, 224, mode), rtol=1e-5, atol=1e-7
        )


# --------------------------------------------------------------------------------------------
# anomalib's Reverse Distillation
# --------------------------------------------------------------------------------------------
class _AnomalibMode(str, enum.Enum):  # the shape of anomalib's AnomalyMapGenerationMode
    ADD = "add"
    MULTIPLY = "multiply"


@given(
    batch=st.integers(1, 3),
    layers=layers_st,
    sigma=st.sampled_from([1, 2, 4, 2.5]),
    data=st.data(),
    mode=st.sampled_from(["multiply", "add", _AnomalibMode.ADD, _AnomalibMode.MULTIPLY]),
    seed=st.integers(0, 2**16),
)
def test_anomalib_generator_equals_original(batch, layers, sigma, data, mode, seed):
    r = int(4 * sigma + 0.5)  # F.pad's 'reflect' needs a size above the radius
    image_size = data.draw(st.tuples(st.integers(r + 1, 40), st.integers(r + 1, 40)))
    fs, ft = _features(batch, layers, seed)
    generator = dropin.ReverseDistillationAnomalyMapGenerator(image_size, sigma=sigma, mode=mode)
    out = generator(fs, ft)
    expected = _original_anomalib(fs, ft, image_size, sigma, str(getattr(mode, "value", mode)))
    assert out.shape == expected.shape == (batch, 1, *image_size) and out.dtype == torch.float32
    assert out.device == fs[0].device
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_anomalib_generator_defaults_and_attributes():
    generator = dropin.ReverseDistillationAnomalyMapGenerator([64, 48])
    assert isinstance(generator, torch.nn.Module)
    assert generator.image_size == (64, 48) and generator.sigma == 4 and generator.kernel_size == 33
    assert generator.mode == "multiply"
    fs, ft = _features(2, FOUR_LAYERS, 2)
    torch.testing.assert_close(
        generator(fs, ft), _original_anomalib(fs, ft, (64, 48), 4, "multiply"), rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("mode", ["multiply", "add"])
def test_anomalib_generator_small_images_follow_scipy_mirror(mode):
    # Sizes up to the radius, where F.pad's 'reflect' refuses: the reflection repeats, as in scipy.
    fs, ft = _features(2, [(4, 3, 3), (4, 2, 2)], 4)
    out = dropin.ReverseDistillationAnomalyMapGenerator(10, sigma=4, mode=mode)(fs, ft)
    maps = [_upsampled_error(a, b, (10, 10))[:, 0].numpy().astype(np.float64) for a, b in zip(fs, ft)]
    combined = maps[0] * maps[1] if mode == "multiply" else maps[0] + maps[1]
    expected = np.stack([scipy.ndimage.gaussian_filter(m, 4, mode="mirror") for m in combined])
    np.testing.assert_allclose(out[:, 0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_anomalib_generator_is_differentiable():
    fs, ft = _features(2, [(4, 5, 5), (6, 3, 3)], 6)
    leaves = [t.clone().requires_grad_() for t in fs + ft]
    ref_leaves = [t.clone().requires_grad_() for t in fs + ft]
    weight = torch.randn(2, 1, 20, 20)
    for mode in ("multiply", "add"):
        out = dropin.ReverseDistillationAnomalyMapGenerator((20, 20), sigma=1, mode=mode)(leaves[:2], leaves[2:])
        ref = _original_anomalib(ref_leaves[:2], ref_leaves[2:], (20, 20), 1, mode)
        got = torch.autograd.grad((out * weight).sum(), leaves)
        exp = torch.autograd.grad((ref * weight).sum(), ref_leaves)
        for g, e in zip(got, exp):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Every drop-in through the Triton kernels (in the interpreter here)
# --------------------------------------------------------------------------------------------
def test_dropins_through_triton_kernels():
    fs, ft = _features(2, [(4, 4, 4), (8, 2, 3)], 9)
    with ops.backend("triton"):
        rd, _ = dropin.rd4ad_cal_anomaly_map(fs, ft, 20, "mul")
        ck = dropin.ckaad_cal_anomaly_map(fs, ft, 20, "add")
        an = dropin.ReverseDistillationAnomalyMapGenerator((20, 18), sigma=2)(fs, ft)
        loss = dropin.cosine_distillation_loss(fs, ft)
    for i in range(2):
        np.testing.assert_allclose(rd[i], _original_rd4ad(_image(fs, i), _image(ft, i), 20, "mul")[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ck, _original_ckaad(fs, ft, 20, "add"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(an, _original_anomalib(fs, ft, (20, 18), 2, "multiply"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, _original_rd4ad_loss(fs, ft), rtol=1e-5, atol=1e-6)


def test_integer_like_sizes():
    # Evaluation loops pass img.shape[-1], which may be a NumPy or a 0-d tensor integer.
    fs, ft = _features(2, [(4, 3, 3)], 8)
    expected = dropin.rd4ad_cal_anomaly_map(fs, ft, 12, "a")[0]
    for size in (np.int64(12), torch.tensor(12)):
        assert np.array_equal(dropin.rd4ad_cal_anomaly_map(fs, ft, size, "a")[0], expected)
        assert dropin.ckaad_cal_anomaly_map(fs, ft, size, "add").shape == (2, 12, 12)
    assert dropin.ReverseDistillationAnomalyMapGenerator(np.int64(20))(fs, ft).shape == (2, 1, 20, 20)


@pytest.mark.parametrize("mode", ["multiply", "add"])
def test_generator_and_loss_compile_without_graph_breaks(mode):
    fs, ft = _features(2, [(4, 5, 5), (8, 3, 3)], 10)
    generator = dropin.ReverseDistillationAnomalyMapGenerator((20, 18), sigma=2, mode=mode)
    compiled = torch.compile(generator, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(fs, ft), generator(fs, ft))
    per_position = mode == "add"
    loss = torch.compile(
        lambda a, b: dropin.cosine_distillation_loss(a, b, per_position=per_position), fullgraph=True, backend="aot_eager"
    )
    torch.testing.assert_close(loss(fs, ft), dropin.cosine_distillation_loss(fs, ft, per_position=per_position))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_dropins_on_cuda_match_the_originals_on_cpu():
    # Against the originals run on the CPU in float32 (no TF32 on that side); ours may use TF32.
    fs, ft = _features(3, [(64, 16, 16), (128, 8, 8), (256, 4, 4), (32, 2, 2)], 21)
    cfs, cft = [f.cuda() for f in fs], [f.cuda() for f in ft]
    tol = dict(rtol=1e-3, atol=1e-4)
    for mode in ("multiply", "add"):
        out = dropin.ReverseDistillationAnomalyMapGenerator((64, 48), mode=mode)(cfs, cft)
        assert out.device == cfs[0].device and out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), _original_anomalib(fs, ft, (64, 48), 4, mode), **tol)
    for mode in ("mul", "a"):
        amap, a_maps = dropin.rd4ad_cal_anomaly_map(cfs, cft, 40, mode)
        for i in range(3):
            exp, exp_list = _original_rd4ad(_image(fs, i), _image(ft, i), 40, mode)
            np.testing.assert_allclose(amap[i], exp, **tol)
            for g, e in zip(a_maps, exp_list):
                np.testing.assert_allclose(g[i], e, **tol)
    for mode in ("mul", "add", "max"):
        np.testing.assert_allclose(dropin.ckaad_cal_anomaly_map(cfs, cft, 40, mode), _original_ckaad(fs, ft, 40, mode), **tol)
    torch.testing.assert_close(dropin.cosine_distillation_loss(cfs, cft).cpu(), _original_rd4ad_loss(fs, ft), **tol)


# --------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------
def _leaves(xs, dtype=None):
    return [x.detach().to(dtype or x.dtype).clone().requires_grad_() for x in xs]


def _check_loss(ours, original, enc, dec):
    """Loss and gradients against the original run in float64 (the tolerance rule of docs/ARCHITECTURE.md)."""
    a, b = _leaves(enc), _leaves(dec)
    a64, b64 = _leaves(enc, torch.float64), _leaves(dec, torch.float64)
    loss, ref = ours(a, b), original(a64, b64)
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close_to_ref(loss, ref, torch.float32)
    got = torch.autograd.grad(loss, a + b, allow_unused=True)
    exp = torch.autograd.grad(ref, a64 + b64, allow_unused=True)
    for g, e in zip(got, exp):
        if e is None:
            assert g is None or not g.abs().any()
        else:
            assert_close_to_ref(g, e, torch.float32)


@given(batch=st.integers(1, 3), layers=layers_st, seed=st.integers(0, 2**16))
def test_loss_equals_rd4ad_loss(batch, layers, seed):
    enc, dec = _features(batch, layers, seed)
    _check_loss(dropin.cosine_distillation_loss, _original_rd4ad_loss, enc, dec)


def test_loss_stop_grad_is_recontrast_global_cosine():
    enc, dec = _features(3, FOUR_LAYERS, 11)
    _check_loss(
        lambda a, b: dropin.cosine_distillation_loss(a, b, stop_grad=True),
        lambda a, b: _original_rd4ad_loss([x.detach() for x in a], b),
        enc,
        dec,
    )


@given(batch=st.integers(1, 3), layers=layers_st, seed=st.integers(0, 2**16))
def test_loss_per_position_is_recontrast_region_cosine(batch, layers, seed):
    enc, dec = _features(batch, layers, seed)
    _check_loss(
        lambda a, b: dropin.cosine_distillation_loss(a, b, per_position=True, stop_grad=True),
        _original_region_cosine,
        enc,
        dec,
    )


@pytest.mark.parametrize("alpha,factor", [(1.0, 0.0), (0.0, 0.5), (-0.5, 0.1)])
def test_loss_hard_mining_is_recontrast_global_cosine_hm(alpha, factor):
    enc, dec = _features(2, [(8, 6, 6), (16, 3, 3), (4, 1, 1)], 13)
    _check_loss(
        lambda a, b: dropin.cosine_distillation_loss(
            a, b, stop_grad=True, hard_mining_alpha=alpha, hard_mining_factor=factor
        ),
        lambda a, b: _original_global_cosine_hm(a, b, alpha, factor),
        enc,
        dec,
    )


def test_loss_half_precision_and_layouts():
    enc, dec = _features(2, [(8, 4, 4)], 3, torch.float16)
    dec = [d.contiguous(memory_format=torch.channels_last) for d in dec]
    loss = dropin.cosine_distillation_loss(enc, dec)
    ref = _original_rd4ad_loss([e.double() for e in enc], [d.double() for d in dec])
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
def test_bad_input():
    f = [torch.randn(2, 3, 4, 4)]
    for fn in (dropin.rd4ad_cal_anomaly_map, dropin.ckaad_cal_anomaly_map):
        with pytest.raises(ValueError, match="fs_list is empty"):
            fn([], [])
        with pytest.raises(ValueError, match="one tensor per layer each, got 1 and 2"):
            fn(f, f + f)
        with pytest.raises(ValueError, match=r"fs_list\[0\] and ft_list\[0\] must have the same shape"):
            fn(f, [torch.randn(2, 3, 4, 5)])
        with pytest.raises(ValueError, match=r"every tensor in fs_list must have the same batch size, got \[2, 3\]"):
            fn(f + [torch.randn(3, 3, 2, 2)], f + [torch.randn(3, 3, 2, 2)])
        with pytest.raises(ValueError, match=r"must have 4 dims"):
            fn([torch.randn(3, 4, 4)], [torch.randn(3, 4, 4)])
        with pytest.raises(ValueError, match="out_size must be >= 1"):
            fn(f, f, 0)
        with pytest.raises(ValueError, match="amap_mode must be one of"):
            fn(f, f, 16, "mult")
        with pytest.raises(TypeError, match=r"fs_list\[0\] must be float32"):
            fn([f[0].int()], [f[0].int()])
    with pytest.raises(ValueError, match="amap_mode must be one of"):
        dropin.rd4ad_cal_anomaly_map(f, f, 16, "max")  # RD4AD has no 'max'
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        dropin.rd4ad_cal_anomaly_map(f, f, 16, "a", sigma=-1)
    with pytest.raises(ValueError, match="mode must be 'multiply' or 'add'"):
        dropin.ReverseDistillationAnomalyMapGenerator((16, 16), mode="mul")
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        dropin.ReverseDistillationAnomalyMapGenerator((16, 16), sigma=float("nan"))
    with pytest.raises(ValueError, match="image_size must be an int or an"):
        dropin.ReverseDistillationAnomalyMapGenerator((16, 16, 3))
    with pytest.raises(ValueError, match="image_size must be an int or an"):
        dropin.ReverseDistillationAnomalyMapGenerator(16.0)
    generator = dropin.ReverseDistillationAnomalyMapGenerator((16, 16))
    with pytest.raises(ValueError, match="student_features and teacher_features must have one tensor per layer each"):
        generator(f, f + f)
    with pytest.raises(ValueError, match=r"student_features\[0\] and teacher_features\[0\] must have the same shape"):
        generator(f, [torch.randn(2, 3, 4, 5)])
    with pytest.raises(ValueError, match="encoder_features is empty"):
        dropin.cosine_distillation_loss([], [])
    with pytest.raises(ValueError, match=r"encoder_features\[0\] and decoder_features\[0\] must have the same shape"):
        dropin.cosine_distillation_loss(f, [torch.randn(2, 3, 4, 5)])
    with pytest.raises(ValueError, match="hard_mining_alpha must be a finite number"):
        dropin.cosine_distillation_loss(f, f, hard_mining_alpha=float("inf"))


def test_nan_stays_in_its_image():
    fs, ft = _features(2, [(4, 5, 5)], 0)
    fs[0][1, 2, 3, 3] = float("nan")
    amap, _ = dropin.rd4ad_cal_anomaly_map(fs, ft, 12, "mul", sigma=4)
    assert not np.isnan(amap[0]).any() and np.isnan(amap[1]).all()
    out = dropin.ckaad_cal_anomaly_map(fs, ft, 12, "add")
    assert not np.isnan(out[0]).any() and np.isnan(out[1]).all()
