"""Tests of ckaad_fast.metrics against sklearn and against slow, literal implementations.

The slow implementations below are written from the metrics' definitions: the per-image one
follows the CKAAD / RD4AD reference code's protocol step by step (a loop over its thresholds,
regions relabelled at every threshold), the standard AUPRO loops over every distinct threshold.
"""
from __future__ import annotations

import bisect
import math
import warnings

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import ndimage

from ckaad_fast.metrics import pro
from ckaad_fast.metrics import aupro, aupro_per_image, evaluate, image_auroc, image_f1_acc, pixel_auroc

skm = pytest.importorskip("sklearn.metrics")

try:  # the reference code labels with skimage; scipy with a 3x3 structure is the same
    from skimage import measure as _skmeasure
except ImportError:  # pragma: no cover
    _skmeasure = None


# --------------------------------------------------------------------------------------------
# Slow references
# --------------------------------------------------------------------------------------------
def _regions(mask: np.ndarray) -> list[np.ndarray]:
    """Pixel coordinates of each 8-connected region of a 2-D mask."""
    if _skmeasure is not None:
        return [r.coords for r in _skmeasure.regionprops(_skmeasure.label(mask))]
    lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
    return [np.argwhere(lab == k) for k in range(1, n + 1)]


def ref_pro_one_image(mask: np.ndarray, amap: np.ndarray, num_th: int = 200, limit: float = 0.3) -> float:
    """The reference protocol for one image, literally; NaN where the reference fails."""
    lo, hi = amap.min(), amap.max()
    if not hi > lo:
        return math.nan
    pros, fprs = [], []
    inverse = 1 - mask
    for th in np.arange(lo, hi, (hi - lo) / num_th):
        binary = np.zeros_like(amap, dtype=bool)
        binary[amap <= th] = 0
        binary[amap > th] = 1
        per_region = []
        for coords in _regions(mask):
            per_region.append(binary[coords[:, 0], coords[:, 1]].sum() / len(coords))
        pros.append(float(np.mean(per_region)))
        with np.errstate(invalid="ignore", divide="ignore"):
            fprs.append(np.logical_and(inverse, binary).sum() / inverse.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    keep = fprs < limit
    fprs, pros = fprs[keep], pros[keep]
    with np.errstate(invalid="ignore", divide="ignore"):
        fprs = fprs / fprs.max() if fprs.size else fprs
    try:
        return skm.auc(fprs, pros)
    except ValueError:
        return math.nan


def ref_aupro_per_image(masks, maps, num_th=200, limit=0.3) -> list[float]:
    return [
        ref_pro_one_image(m.astype(int), a, num_th, limit) for m, a in zip(masks, maps) if m.any()
    ]


def _trapezoid_to(x, y, x_max):
    """Area under the polyline up to x_max, interpolating at x_max (MVTec AD's rule)."""
    x, y = list(x), list(y)
    correction = 0.0
    if x_max not in x:
        ins = bisect.bisect(x, x_max)
        assert 0 < ins < len(x)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_at + y[ins - 1]) * (x_max - x[ins - 1])
    pts = [(a, b) for a, b in zip(x, y) if a <= x_max]
    area = sum(0.5 * (pts[i][1] + pts[i - 1][1]) * (pts[i][0] - pts[i - 1][0]) for i in range(1, len(pts)))
    return area + correction


def ref_aupro(masks, maps, limit=0.3) -> float:
    """Standard AUPRO by brute force: every distinct threshold, O(T * N)."""
    masks = masks.astype(bool)
    regions = []
    for i, m in enumerate(masks):
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        regions += [(i, lab == k) for k in range(1, n + 1)]
    normal = ~masks
    xs, ys = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        pred = maps >= t
        ys.append(float(np.mean([pred[i][r].sum() / r.sum() for i, r in regions])))
        xs.append((pred & normal).sum() / normal.sum())
    return _trapezoid_to(xs, ys, limit) / limit


def ref_f1_acc(labels, scores):
    """What the CKAAD reference code computes."""
    precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
    f1 = 2 * (precision * recall) / (precision + recall + 1e-16)
    thr = thresholds[np.argmax(f1)]
    pred = np.where(scores >= thr, 1, 0)
    return np.max(f1), np.mean(pred == labels), thr


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------
@st.composite
def image_data(draw, max_n=40):
    n = draw(st.integers(2, max_n))
    labels = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)))
    if labels.all() or not labels.any():
        labels[0] = not labels[0]
    if draw(st.booleans()):  # few distinct values: many ties
        scores = np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), dtype=np.float64)
    else:
        scores = np.array(
            draw(st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=n, max_size=n)),
            dtype=np.float32,
        )
    return labels.astype(draw(st.sampled_from([bool, np.int64, np.float32]))), scores


@st.composite
def pixel_data(draw, max_n=3, max_hw=7, levels=None):
    n = draw(st.integers(1, max_n))
    h = draw(st.integers(1, max_hw))
    w = draw(st.integers(2, max_hw))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    masks = rng.random((n, h, w)) < draw(st.sampled_from([0.05, 0.2, 0.5]))
    if draw(st.booleans()) and n > 1:
        masks[0] = False  # an image with no anomaly
    flat = masks.reshape(-1)
    flat[rng.integers(flat.size)] = True  # at least one anomalous pixel
    if flat.all():
        flat[0] = False  # and at least one normal one
    if levels is None:
        levels = draw(st.sampled_from([3, 10, 0]))
    if levels:  # quantised maps: ties within and across classes
        maps = rng.integers(0, levels, size=masks.shape).astype(np.float32) / levels
    else:
        maps = rng.random(masks.shape, dtype=np.float32)
    maps = maps + 0.5 * masks * draw(st.sampled_from([0.0, 0.3, 1.0]))  # some signal
    return masks, maps.astype(np.float32)


def _blobs(n, h, w, seed):
    """Synthetic blob masks and blurred maps that partly see them (float32, like the reference)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    masks = np.zeros((n, h, w), dtype=bool)
    for i in range(1, n):  # image 0 stays normal
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, max(3, h // 6))
            masks[i] |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    noise = rng.random((n, h, w))
    maps = ndimage.gaussian_filter(noise + 1.5 * masks * rng.random((n, 1, 1)), sigma=(0, 2, 2))
    return masks, maps.astype(np.float32)


# --------------------------------------------------------------------------------------------
# Image metrics
# --------------------------------------------------------------------------------------------
@given(image_data())
def test_image_auroc_matches_sklearn(data):
    labels, scores = data
    assert image_auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)


@given(image_data())
def test_image_f1_acc_matches_reference(data):
    labels, scores = data
    f1, acc, thr = image_f1_acc(labels, scores)
    rf1, racc, rthr = ref_f1_acc(labels.astype(int), scores)
    assert f1 == pytest.approx(rf1, abs=1e-12)
    assert acc == pytest.approx(racc, abs=1e-12)
    assert thr == rthr


def test_image_metrics_known_values():
    labels = np.array([0, 0, 1, 1, 0, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.35, 0.9])
    assert image_auroc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert image_auroc([0, 1], [1.0, 1.0]) == 0.5
    assert image_auroc([0, 1], [0.0, 1.0]) == 1.0
    assert image_auroc([1, 0], [0.0, 1.0]) == 0.0
    f1, acc, thr = image_f1_acc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4])
    assert (f1, acc, thr) == (pytest.approx(1.0), 1.0, pytest.approx(0.3))


def test_image_metrics_accept_torch():
    torch = pytest.importorskip("torch")
    labels = torch.tensor([0, 1, 1, 0, 1])
    scores = torch.tensor([0.2, 0.9, 0.4, 0.5, 0.1], dtype=torch.bfloat16)
    ref = skm.roc_auc_score(labels.numpy(), scores.float().numpy())
    assert image_auroc(labels, scores) == pytest.approx(ref)
    expected = image_f1_acc(labels.numpy(), scores.float().numpy())
    assert image_f1_acc(labels, scores) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------
# Pixel AUROC
# --------------------------------------------------------------------------------------------
@given(pixel_data(max_n=4, max_hw=12))
def test_pixel_auroc_matches_sklearn(data):
    masks, maps = data
    ref = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(ref, abs=1e-12)


def test_pixel_auroc_larger_and_torch():
    torch = pytest.importorskip("torch")
    masks, maps = _blobs(6, 64, 64, seed=3)
    ref = skm.roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(masks, maps) == pytest.approx(ref, abs=1e-12)
    assert pixel_auroc(torch.from_numpy(masks), torch.from_numpy(maps)) == pytest.approx(ref, abs=1e-12)
    # (N, 1, H, W) and 0/1 floats are accepted as well
    assert pixel_auroc(masks[:, None].astype(np.float32), maps[:, None]) == pytest.approx(ref, abs=1e-12)


# --------------------------------------------------------------------------------------------
# Standard AUPRO
# --------------------------------------------------------------------------------------------
@given(pixel_data(), st.sampled_from([0.3, 0.05, 0.5, 1.0]))
def test_aupro_matches_brute_force(data, limit):
    masks, maps = data
    ref = ref_aupro(masks, maps, limit)
    assert aupro(masks, maps, fpr_limit=limit) == pytest.approx(ref, abs=1e-10)
    # evaluate() reuses the sorted normal pixels of the pixel AUROC: the same number
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # per-image AUPRO of tiny images
        # One label per image: the image metrics need both classes, so alternate them.
        n = masks.shape[0]
        labels = [i % 2 for i in range(n)] if n > 1 else None
        if labels is not None:
            out = evaluate(labels, np.arange(n, dtype=float), masks, maps, fpr_limit=limit)
            assert out["aupro"] == pytest.approx(ref, abs=1e-10)


@settings(max_examples=4)
@given(st.integers(0, 1000))
def test_aupro_matches_brute_force_on_blobs(seed):
    masks, maps = _blobs(3, 14, 14, seed)
    maps = np.round(maps, 2)  # ties
    assert aupro(masks, maps) == pytest.approx(ref_aupro(masks, maps), abs=1e-10)


def test_aupro_known_values():
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 1:3, 1:3] = True
    masks[1, 5, 5] = True  # single-pixel region
    perfect = masks.astype(np.float32) + 0.1 * np.random.default_rng(0).random(masks.shape)
    assert aupro(masks, perfect) == pytest.approx(1.0)
    assert aupro(masks, -perfect) == pytest.approx(0.0)
    # A constant map: one threshold, the curve is the diagonal from (0, 0) to (1, 1), so the
    # area up to 0.3 is 0.3**2 / 2 and the normalised area 0.15.
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15)
    # Each region weighs the same whatever its size: find only the single pixel, and PRO is 1/2.
    only_small = np.zeros(masks.shape)
    only_small[1, 5, 5] = 1.0
    assert aupro(masks, only_small) == pytest.approx(ref_aupro(masks, only_small))
    assert aupro(masks, only_small, fpr_limit=1e-6) == pytest.approx(0.5)


def test_aupro_regions_are_8_connected_and_per_image():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[1, 0, 0] = True  # same position, other image: a separate region
    maps = np.zeros(masks.shape)
    maps[0, 0, 0] = 1.0  # half of the diagonal region
    # two regions: overlaps 1/2 and 0, PRO = 1/4 at FPR 0
    assert aupro(masks, maps, fpr_limit=1e-9) == pytest.approx(0.25)


# --------------------------------------------------------------------------------------------
# Per-image AUPRO (reference protocol)
# --------------------------------------------------------------------------------------------
def _ours_per_image(masks, maps, num_th=200, limit=0.3):
    m = masks.astype(bool)
    labels, _ = ndimage.label(m, structure=pro._STRUCTURE_3D)
    values, _ = pro.aupro_per_image_values(m, maps, labels, num_th, limit)
    return values


@given(
    st.floats(-1e6, 1e6, width=32),
    st.floats(1e-30, 1e3),
    st.integers(1, 300),
    st.integers(0, 2**32 - 1),
)
def test_count_thresholds_below_equals_searchsorted(lo, span, num, seed):
    # Includes grids whose step is below the float32 spacing at lo, where thresholds repeat.
    rng = np.random.default_rng(seed)
    values = (lo + span * rng.random(200)).astype(np.float32)
    values[:3] = values.min(), values.max(), np.float32(lo)
    vlo, vhi = values.min(), values.max()
    assume(vhi > vlo)  # a grid needs a range
    step = (vhi - vlo) / num
    grid = np.arange(vlo, vhi, step)
    got = pro._count_thresholds_below(grid, values, vlo, step)
    np.testing.assert_array_equal(got, np.searchsorted(grid, values, side="left"))
    values = np.concatenate([values, grid.astype(np.float32)])  # values on the grid points
    got = pro._count_thresholds_below(grid, values, vlo, step)
    np.testing.assert_array_equal(got, np.searchsorted(grid, values, side="left"))


@given(pixel_data(max_hw=9), st.sampled_from([200, 17]), st.sampled_from([0.3, 0.6]))
def test_aupro_per_image_matches_reference_loop(data, num_th, limit):
    masks, maps = data
    ours = _ours_per_image(masks, maps, num_th, limit)
    ref = ref_aupro_per_image(masks, maps, num_th, limit)
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12, equal_nan=True)


@settings(max_examples=3)
@given(st.integers(0, 1000))
def test_aupro_per_image_matches_reference_on_blobs(seed):
    masks, maps = _blobs(3, 48, 48, seed)
    ref = ref_aupro_per_image(masks, maps)
    assert not np.isnan(ref).any()
    np.testing.assert_allclose(_ours_per_image(masks, maps), ref, rtol=1e-12, atol=1e-12)
    assert aupro_per_image(masks, maps) == pytest.approx(np.mean(ref), abs=1e-12)


def test_aupro_per_image_float64_and_int_masks():
    masks, maps = _blobs(3, 32, 32, seed=7)
    maps64 = maps.astype(np.float64) * 3.7
    ref = ref_aupro_per_image(masks, maps64)
    assert aupro_per_image(masks.astype(np.int32), maps64) == pytest.approx(np.mean(ref), abs=1e-12)


def test_aupro_per_image_skips_normal_images_and_warns_on_undefined():
    masks = np.zeros((3, 5, 5), dtype=bool)
    masks[1, 2, 2] = True  # single-pixel region
    masks[2, 0:2, 0:2] = True
    rng = np.random.default_rng(1)
    maps = rng.random(masks.shape).astype(np.float32)
    maps[1, 2, 2] = 2.0
    expected = ref_aupro_per_image(masks, maps)
    assert len(expected) == 2 and not np.isnan(expected).any()
    assert aupro_per_image(masks, maps) == pytest.approx(np.mean(expected), abs=1e-12)
    maps[2] = 0.5  # a constant map: the reference cannot build its thresholds
    with pytest.warns(RuntimeWarning, match=r"undefined for 1 image\(s\) \(indices \[2\]"):
        assert math.isnan(aupro_per_image(masks, maps))


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
def test_evaluate():
    torch = pytest.importorskip("torch")
    masks, maps = _blobs(5, 32, 32, seed=11)
    labels = masks.reshape(5, -1).any(1)
    scores = maps.reshape(5, -1).max(1)
    out = evaluate(*(torch.from_numpy(x) for x in (labels, scores, masks, maps)))
    # No "aupimo": 32x32 maps hold too few normal pixels for its FPR range (tests/test_aupimo.py).
    assert set(out) == {"image_auroc", "image_f1", "image_acc", "pixel_auroc", "aupro", "aupro_per_image"}
    assert out["image_auroc"] == pytest.approx(image_auroc(labels, scores))
    assert (out["image_f1"], out["image_acc"]) == pytest.approx(image_f1_acc(labels, scores)[:2])
    assert out["pixel_auroc"] == pytest.approx(pixel_auroc(masks, maps))
    assert out["aupro"] == pytest.approx(aupro(masks, maps))
    assert out["aupro_per_image"] == pytest.approx(aupro_per_image(masks, maps))
    assert all(isinstance(v, float) for v in out.values())
    assert set(evaluate(labels, scores)) == {"image_auroc", "image_f1", "image_acc"}


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: image_auroc([0, 1, 1], [0.1, 0.2]), r"labels.shape=\(3,\).*scores.shape=\(2,\)"),
        (lambda: image_auroc([], []), "empty"),
        (lambda: image_auroc([1, 1, 1], [0.1, 0.2, 0.3]), "both classes"),
        (lambda: image_f1_acc([0, 0], [0.1, 0.2]), "both classes"),
        (lambda: image_auroc([0, 2], [0.1, 0.2]), "labels must be binary"),
        (lambda: image_auroc([0, 1], [0.1, float("nan")]), "scores must be finite"),
        (lambda: image_auroc(np.zeros((2, 2)), np.zeros((2, 2))), "1-D"),
        (
            lambda: pixel_auroc(np.zeros((2, 4, 4)), np.zeros((2, 4, 5))),
            r"masks.shape=\(2, 4, 4\).*maps.shape=\(2, 4, 5\)",
        ),
        (lambda: pixel_auroc(np.zeros((4, 4)), np.zeros((4, 4))), r"\(N, H, W\)"),
        (lambda: pixel_auroc(np.full((1, 2, 2), 0.5), np.zeros((1, 2, 2))), "masks must be binary"),
        (lambda: pixel_auroc(np.zeros((1, 2, 2)), np.zeros((1, 2, 2))), "no anomalous pixel"),
        (lambda: aupro(np.ones((1, 2, 2)), np.zeros((1, 2, 2))), "no normal pixel"),
        (lambda: aupro(np.zeros((0, 2, 2)), np.zeros((0, 2, 2))), "empty"),
        (lambda: aupro(np.eye(3)[None], np.eye(3)[None], fpr_limit=0), "fpr_limit"),
        (lambda: aupro(np.eye(3)[None], np.full((1, 3, 3), np.inf)), "maps must be finite"),
        (lambda: aupro_per_image(np.zeros((2, 3, 3)), np.eye(3)[None].repeat(2, 0)), "no anomalous pixel"),
        (lambda: aupro_per_image(np.eye(3)[None], np.eye(3)[None], num_thresholds=0), "num_thresholds"),
        (lambda: evaluate([0, 1], [0.1, 0.2], masks=np.eye(3)[None]), "together"),
        (lambda: image_auroc(["a", "b"], [0.1, 0.2]), "numbers"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_no_warnings_on_ordinary_input():
    masks, maps = _blobs(4, 32, 32, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(masks.reshape(4, -1).any(1), maps.mean((1, 2)), masks, maps)


def test_evaluate_refuses_labels_and_masks_of_different_images():
    rng = np.random.default_rng(0)
    masks = rng.random((4, 8, 8)) > 0.7
    maps = rng.random((4, 8, 8))
    with pytest.raises(ValueError, match="5 labels and 4 masks"):
        evaluate(np.array([0, 1, 1, 0, 1]), rng.random(5), masks, maps)
