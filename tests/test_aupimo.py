"""AUPIMO against a float64 reference written from the definition (Bertoldo et al. 2024, as the
peer library computes it: thresholds spanning the normal images' values, the shared FPR as the
mean of the normal images' rates, the closest thresholds to the bounds, the trapezoid over
log FPR), and on hand-built cases whose value is known."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ckaad_fast.metrics import aupimo, evaluate


def reference_aupimo(masks, maps, num_thresholds, fpr_bounds):
    """The definition, literally: every rate of every image at every threshold, in float64."""
    masks = np.asarray(masks, bool)
    maps = np.asarray(maps)
    lo, hi = fpr_bounds
    anomalous = masks.reshape(len(masks), -1).any(axis=1)
    normal_values = maps[~anomalous]
    th = np.linspace(normal_values.min(), normal_values.max(), num_thresholds).astype(maps.dtype)
    flags = [(maps[i].reshape(-1)[None, :] >= th[:, None]) for i in range(len(maps))]
    per_image_fpr = np.array([f.mean(axis=1, dtype=np.float64) for f, a in zip(flags, anomalous) if not a])
    shared = per_image_fpr.mean(axis=0)
    start, stop = int(np.argmin(np.abs(shared - hi))), int(np.argmin(np.abs(shared - lo)))
    fpr = shared[start:stop + 1][::-1]
    keep = fpr > 0
    x = np.log(fpr[keep])
    out = np.full(len(maps), np.nan)
    for i in np.flatnonzero(anomalous):
        inside = flags[i][:, masks[i].reshape(-1)].mean(axis=1, dtype=np.float64)
        y = inside[start:stop + 1][::-1][keep]
        area = float(np.sum((y[1:] + y[:-1]) / 2 * np.diff(x)))
        out[i] = min(max(area / math.log(hi / lo), 0.0), 1.0)
    return out


def _set(seed, n_normal=4, n_anomalous=3, size=48, long_tail=False):
    rng = np.random.default_rng(seed)
    n = n_normal + n_anomalous
    # A long tail (as anomaly maps have) spreads the top 1e-4 of the values over many thresholds.
    maps = (rng.exponential(1.0, (n, size, size)) if long_tail else rng.random((n, size, size))).astype(np.float32)
    masks = np.zeros((n, size, size), bool)
    for i in range(n_normal, n):
        r, c = rng.integers(0, size - 12, 2)
        masks[i, r:r + 4 + i, c:c + 9] = True
        maps[i][masks[i]] += rng.random(masks[i].sum()).astype(np.float32) * 1.2  # partly above the normals
    return masks, maps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_aupimo_equals_the_definition_on_random_maps(seed):
    masks, maps = _set(seed)
    bounds = (1e-3, 1e-2)  # 9,216 normal pixels: a rate of 1e-5 is out of their reach
    got = aupimo(masks, maps, num_thresholds=4000, fpr_bounds=bounds)
    ref = reference_aupimo(masks, maps, 4000, bounds)
    assert np.isnan(got.per_image[:4]).all() and np.isnan(ref[:4]).all()
    # The same counts and the same indices; only the order of float64 sums differs.
    np.testing.assert_allclose(got.per_image[4:], ref[4:], rtol=1e-12, atol=1e-12)
    assert got.mean == pytest.approx(ref[4:].mean(), rel=1e-12)
    # The thresholds closest to the bounds: within one normal pixel's rate (1 / 9,216) of them.
    assert got.num_points > 30 and abs(got.fpr_bounds_reached[0] - 1e-3) <= 1 / 9216
    assert abs(got.fpr_bounds_reached[1] - 1e-2) <= 1 / 9216


def test_a_perfect_map_scores_one_and_a_missed_region_its_share():
    rng = np.random.default_rng(3)
    size, n_normal = 128, 8  # 131,072 normal pixels: the default bounds 1e-5 .. 1e-4 are in reach
    # Normal values with a long tail, as anomaly maps have: the top 1e-4 of them spans many thresholds.
    maps = (0.1 + rng.exponential(1.0, (n_normal + 2, size, size))).astype(np.float32)
    masks = np.zeros_like(maps, dtype=bool)
    masks[n_normal, 10:20, 10:20] = True  # one defect, scored above every normal pixel
    maps[n_normal][masks[n_normal]] = 50.0
    masks[n_normal + 1, 40:50, 40:50] = True  # found: 100 pixels
    masks[n_normal + 1, 80:90, 80:110] = True  # missed: 300 pixels scored below every normal one
    maps[n_normal + 1, 40:50, 40:50] = 50.0
    maps[n_normal + 1, 80:90, 80:110] = 0.0
    got = aupimo(masks, maps)  # the definition's defaults: 300,000 thresholds, FPR 1e-5 .. 1e-4
    # An overlap of 1 over the whole range: the range's width on the log scale, normalised; the
    # thresholds closest to the bounds reach them to within one normal pixel's rate.
    reached_lo, reached_hi = got.fpr_bounds_reached
    assert abs(reached_lo - 1e-5) <= 1 / 131072 and abs(reached_hi - 1e-4) <= 1 / 131072
    width = math.log(reached_hi / reached_lo) / math.log(10.0)
    assert got.per_image[n_normal] == pytest.approx(min(width, 1.0), rel=1e-12)
    assert got.per_image[n_normal + 1] == pytest.approx(0.25 * width, rel=1e-12)  # 100 of 400 pixels found
    assert got.mean == pytest.approx((min(width, 1.0) + 0.25 * width) / 2, rel=1e-12)


def test_aupimo_refuses_what_it_cannot_measure():
    masks, maps = _set(4)
    with pytest.raises(ValueError, match="needs normal images .* and anomalous ones"):
        aupimo(np.zeros_like(masks), maps, num_thresholds=100, fpr_bounds=(1e-3, 1e-2))  # normal images only
    with pytest.raises(ValueError, match="needs normal images"):
        aupimo(masks[4:], maps[4:], num_thresholds=100, fpr_bounds=(1e-3, 1e-2))  # anomalous images only
    with pytest.raises(ValueError, match="cannot reach a shared false-positive rate of 1e-05"):
        aupimo(masks, maps, num_thresholds=100)  # 9,216 normal pixels, 1e-5 asked
    with pytest.raises(ValueError, match="thresholds inside the FPR range"):
        aupimo(masks, maps, num_thresholds=200, fpr_bounds=(1e-3, 1e-2))
    assert aupimo(masks, maps, num_thresholds=200, fpr_bounds=(1e-3, 1e-2), force=True).num_points <= 30
    for bad in [(1e-2, 1e-3), (0.0, 1e-3), (1e-3,)]:
        with pytest.raises(ValueError, match="fpr_bounds"):
            aupimo(masks, maps, fpr_bounds=bad)


def test_evaluate_reports_aupimo_where_it_can_be_measured():
    masks, maps = _set(5, n_normal=8, size=128, long_tail=True)
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    scores = maps.reshape(len(maps), -1).max(axis=1)
    out = evaluate(labels, scores, masks, maps)
    assert out["aupimo"] == pytest.approx(aupimo(masks, maps).mean)
    masks, maps = _set(6)  # 9,216 normal pixels: FPR 1e-5 is out of reach
    labels = masks.reshape(len(masks), -1).any(axis=1).astype(int)
    small = evaluate(labels, maps.reshape(len(maps), -1).max(axis=1), masks, maps)
    assert "aupimo" not in small and "pixel_auroc" in small  # left out, not guessed


def test_eval_json_carries_aupimo(tmp_path):
    import json

    from ckaad_fast.cli import main
    from ckaad_fast.data.synthetic import make_texture_dataset

    from helpers import tiny_checkpoint

    # 7 normal test images of 128²: 114,688 normal pixels, enough for a false-positive rate of 1e-5.
    root = make_texture_dataset(tmp_path / "tex", "brick", n_train=2, n_test_good=7, n_test_defect=1,
                                image_size=128, seed=0)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", 128)
    out = tmp_path / "m.json"
    assert main(["eval", "--checkpoint", str(ckpt), "--data", str(root), "--category", "brick", "--json", str(out),
                 "--quiet"]) == 0
    metrics = json.loads(out.read_text())
    assert 0.0 <= metrics["aupimo"] <= 1.0
