"""The two AUPRO definitions: the standard (MVTec AD) one, exact over every distinct threshold,
and the CKAAD / RD4AD reference code's per-image protocol. They are different metrics."""
from __future__ import annotations

import warnings

import numpy as np
from scipy import ndimage

from .inputs import check_fpr_limit, pixel_inputs, require_both_pixel_classes

__all__ = ["aupro", "aupro_per_image", "label_regions", "aupro_from_regions", "aupro_per_image_values",
           "mean_per_image", "check_num_thresholds"]

# 8-connectivity inside one image and none across images, so that one call labels a whole batch
# exactly as skimage.measure.label (default connectivity for 2-D) labels each image on its own.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True


def label_regions(m: np.ndarray) -> tuple[np.ndarray, int]:
    labels, n_regions = ndimage.label(m, structure=_STRUCTURE_3D)
    return labels, int(n_regions)


def _integrate_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    # Trapezoid area under the polyline (x non-decreasing) from x[0] to x_max, interpolating
    # linearly at x_max. Among points sharing the last x <= x_max, the last one is the top of a
    # vertical step, which is where the curve continues from.
    last = int(np.searchsorted(x, x_max, side="right")) - 1
    xs, ys = x[: last + 1], y[: last + 1]
    area = float(np.sum(np.diff(xs) * (ys[1:] + ys[:-1]) / 2.0))
    if xs[-1] < x_max and last + 1 < x.size:
        x0, y0, x1, y1 = x[last], y[last], x[last + 1], y[last + 1]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def _pro_curve(
    m: np.ndarray,
    a: np.ndarray,
    labels: np.ndarray,
    n_regions: int,
    fpr_limit: float,
    normal_sorted: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact (FPR, PRO) polyline over all thresholds, up to the first point with FPR > limit.

    A threshold t predicts ``map >= t``. PRO(t) is the sum over anomalous pixels >= t of
    ``1 / (n_regions * area(region))``, FPR(t) the fraction of normal pixels >= t.
    ``normal_sorted``, the sorted normal scores, may be passed when the caller has them.
    """
    normal = a[~m] if normal_sorted is None else normal_sorted
    n_normal = normal.size
    anom = a[m]
    region = labels[m]
    area = np.bincount(region, minlength=n_regions + 1)
    weight = 1.0 / (n_regions * area[region].astype(np.float64))

    # Only thresholds down to the first one whose FPR exceeds the limit shape the area. That
    # threshold is the c-th largest normal score, c the smallest count with c / n > limit; a
    # linear-time partition finds it, and only pixels at or above it need sorting.
    c = int(np.floor(fpr_limit * n_normal)) + 1
    while c > 1 and (c - 1) / n_normal > fpr_limit:
        c -= 1
    while c <= n_normal and c / n_normal <= fpr_limit:
        c += 1
    if c <= n_normal:
        if normal_sorted is None:
            floor_t = np.partition(normal, n_normal - c)[n_normal - c]
            normal = np.sort(normal[normal >= floor_t])
        else:
            floor_t = normal[n_normal - c]
            normal = normal[np.searchsorted(normal, floor_t, side="left") :]
        keep = anom >= floor_t
        anom, weight = anom[keep], weight[keep]
    else:
        floor_t = min(normal.min(), anom.min())
        if normal_sorted is None:
            normal = np.sort(normal)
    order = np.argsort(anom, kind="stable")
    anom = anom[order]
    # pro_from[i] = PRO mass of anomalous pixels sorted at index >= i (pro_from[len] = 0).
    pro_from = np.zeros(anom.size + 1)
    pro_from[:-1] = np.cumsum(weight[order][::-1])[::-1]

    # Between two consecutive distinct anomalous values only normal pixels enter, so the curve
    # is horizontal there. Two points per anomalous value t (just above t, and at t), plus one
    # at the floor threshold, therefore trace the full polyline over every distinct threshold.
    # anom is sorted and at or above floor_t.
    distinct = anom[np.append(True, anom[1:] != anom[:-1])] if anom.size else anom
    if not (distinct.size and distinct[0] == floor_t):
        distinct = np.append(floor_t, distinct)
    distinct = distinct[::-1]
    t_gt = np.searchsorted(normal, distinct, side="right")
    t_ge = np.searchsorted(normal, distinct, side="left")
    fp_gt = normal.size - t_gt
    fp_ge = normal.size - t_ge
    pro_gt = pro_from[np.searchsorted(anom, distinct, side="right")]
    pro_ge = pro_from[np.searchsorted(anom, distinct, side="left")]
    fpr = np.empty(2 * distinct.size + 1)
    pro = np.empty_like(fpr)
    fpr[0] = pro[0] = 0.0
    fpr[1::2], fpr[2::2] = fp_gt / n_normal, fp_ge / n_normal
    pro[1::2], pro[2::2] = pro_gt, pro_ge
    return fpr, pro


def aupro_from_regions(
    m: np.ndarray,
    a: np.ndarray,
    labels: np.ndarray,
    n_regions: int,
    fpr_limit: float,
    normal_sorted: np.ndarray | None = None,
) -> float:
    fpr, pro = _pro_curve(m, a, labels, n_regions, fpr_limit, normal_sorted)
    return float(_integrate_to(fpr, pro, fpr_limit) / fpr_limit)


def aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve, standard (MVTec AD) definition, computed exactly.

    Regions are the 8-connected components of each image's mask (``scipy.ndimage.label`` with a
    3x3 structure of ones); let there be ``K`` over the whole test set. For every distinct value
    ``t`` of the maps, pixels with ``map >= t`` are predicted anomalous, and

    - ``PRO(t) = (1/K) sum_k |{p in region k : map_p >= t}| / |region k|``,
    - ``FPR(t) = |{normal p : map_p >= t}| / |{normal p}|`` over the normal pixels of all images.

    The points ``(FPR(t), PRO(t))`` in order of decreasing ``t``, starting from ``(0, 0)``, form a
    polyline; the result is its area from FPR 0 to ``fpr_limit`` (interpolated linearly at
    ``fpr_limit``), divided by ``fpr_limit``. No threshold grid: one partition and one sort of the
    pixels that can matter give the exact value.

    Args:
        masks: ``(N, H, W)`` binary ground truth; needs at least one anomalous and one normal pixel.
        maps: ``(N, H, W)`` finite anomaly maps.
        fpr_limit: upper integration limit in (0, 1].
    """
    fpr_limit = check_fpr_limit(fpr_limit)
    m, a = pixel_inputs(masks, maps)
    require_both_pixel_classes(m)
    labels, n_regions = label_regions(m)
    return aupro_from_regions(m, a, labels, n_regions, fpr_limit)


# --------------------------------------------------------------------------------------------
# AUPRO, per-image reference protocol
# --------------------------------------------------------------------------------------------
def _count_thresholds_below(thresholds: np.ndarray, values: np.ndarray, lo, step) -> np.ndarray:
    """``np.searchsorted(thresholds, values, side="left")`` for an evenly spaced grid.

    The grid's spacing gives each value's rank arithmetically, which is off by at most one where
    rounding bites; comparing with the grid's actual neighbours fixes that. It is about twice as
    fast as a binary search per pixel, and falls back to one if the grid is degenerate.
    """
    k = thresholds.size
    step = float(step)
    if not (np.isfinite(step) and step > 0):
        return np.searchsorted(thresholds, values, side="left")
    est = np.ceil((values.astype(np.float64) - float(lo)) / step)
    np.clip(est, 0, k, out=est)
    rank = est.astype(np.intp)
    padded = np.concatenate(([-np.inf], thresholds.astype(np.float64), [np.inf]))
    for _ in range(3):
        too_high = padded[rank] >= values  # thresholds[rank - 1] is not below the value
        too_low = padded[rank + 1] < values  # thresholds[rank] is below the value
        if not (too_high.any() or too_low.any()):
            return rank
        rank += too_low
        rank -= too_high
    return np.searchsorted(thresholds, values, side="left")


def aupro_per_image_values(
    m: np.ndarray, a: np.ndarray, labels: np.ndarray, num_thresholds: int, fpr_limit: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per-image AUPRO of every anomalous image (NaN where undefined) and those images' indices."""
    flat_m = m.reshape(m.shape[0], -1)
    anomalous = np.flatnonzero(flat_m.any(axis=1))
    values = np.full(anomalous.size, np.nan)
    for out, i in enumerate(anomalous):
        mi = flat_m[i]
        ai = a[i].reshape(-1)
        lo, hi = ai.min(), ai.max()
        step = (hi - lo) / num_thresholds
        if not step > 0:
            # A constant map (or a range that underflows the map's dtype): the reference's
            # np.arange cannot make its thresholds.
            continue
        # np.arange on the map's own scalars, as the reference does: its length (200 or 201)
        # and its values decide every point, and it is cheap.
        thresholds = np.arange(lo, hi, step)
        n_t = thresholds.size
        # A pixel is predicted anomalous at threshold k (map > thresholds[k]) exactly when
        # k < rank, the number of thresholds strictly below its value.
        rank = _count_thresholds_below(thresholds, ai, lo, step)
        normal_rank = rank[~mi]
        n_normal = normal_rank.size
        if n_normal == 0:
            continue
        # fp[k] = #{normal pixels with rank > k}: a histogram of ranks, summed from the top.
        fp = np.cumsum(np.bincount(normal_rank, minlength=n_t + 1)[::-1])[::-1][1:]
        region = labels[i].reshape(-1)[mi]
        region = region - region.min()  # ids of one image are consecutive in raster order
        n_reg = int(region.max()) + 1
        hist = np.bincount(region * (n_t + 1) + rank[mi], minlength=n_reg * (n_t + 1))
        tp = np.cumsum(hist.reshape(n_reg, n_t + 1)[:, ::-1], axis=1)[:, ::-1][:, 1:]
        area = np.bincount(region, minlength=n_reg)
        pro = (tp / area[:, None]).mean(axis=0)
        fpr = fp / n_normal
        keep = fpr < fpr_limit
        if np.count_nonzero(keep) < 2:
            continue
        x = fpr[keep]
        x_top = x.max()
        if x_top == 0:
            continue  # the reference divides 0 by 0 here
        x = x / x_top
        y = pro[keep]
        # sklearn.metrics.auc: the points stay in threshold order, so x falls; auc flips the sign.
        dx = np.diff(x)
        direction = -1.0 if np.any(dx < 0) else 1.0
        values[out] = direction * float(np.sum(dx * (y[1:] + y[:-1]) / 2.0))
    return values, anomalous


def aupro_per_image(masks, maps, num_thresholds: int = 200, fpr_limit: float = 0.3) -> float:
    """AUPRO by the CKAAD / RD4AD reference-code protocol (per image, threshold grid).

    For each image whose mask has an anomalous pixel (the others are skipped), with ``lo`` and
    ``hi`` the min and max of that image's map:

    - thresholds ``t_k = np.arange(lo, hi, (hi - lo) / num_thresholds)``; pixels with
      ``map > t_k`` are predicted anomalous;
    - ``PRO_k`` = mean over the image's 8-connected mask regions of the fraction of the region
      predicted anomalous; ``FPR_k`` = fraction of the image's normal pixels predicted anomalous;
    - keep the points with ``FPR_k < fpr_limit``, divide their FPR by the largest kept FPR, and
      take the trapezoid area in threshold order, as ``sklearn.metrics.auc`` does (its sign
      flipped, since the FPR falls as the threshold rises).

    The result is the mean over those images. It is vectorised over thresholds (a histogram of
    each pixel's threshold rank, summed cumulatively), not a loop.

    The reference crashes or returns NaN where the protocol is undefined: a constant map, an
    image without normal pixels, fewer than two kept points, or all kept FPR zero. Such an
    image's value is NaN here, a ``RuntimeWarning`` says so, and the mean is NaN.

    Args:
        masks: ``(N, H, W)`` binary ground truth; at least one image needs an anomalous pixel.
        maps: ``(N, H, W)`` finite anomaly maps.
        num_thresholds: number of grid steps between an image's min and max.
        fpr_limit: points with FPR below it are kept, in (0, 1].
    """
    fpr_limit = check_fpr_limit(fpr_limit)
    num_thresholds = check_num_thresholds(num_thresholds)
    m, a = pixel_inputs(masks, maps)
    if not m.any():
        raise ValueError("masks has no anomalous pixel; the metric is undefined")
    labels, _ = label_regions(m)
    return mean_per_image(aupro_per_image_values(m, a, labels, num_thresholds, fpr_limit))


def check_num_thresholds(num_thresholds: int) -> int:
    if isinstance(num_thresholds, bool) or int(num_thresholds) != num_thresholds or num_thresholds < 1:
        raise ValueError(f"num_thresholds must be a positive integer, got {num_thresholds!r}")
    return int(num_thresholds)


def mean_per_image(result: tuple[np.ndarray, np.ndarray]) -> float:
    values, images = result
    bad = images[np.isnan(values)]
    if bad.size:
        warnings.warn(
            f"per-image AUPRO is undefined for {bad.size} image(s) (indices {bad[:10].tolist()}"
            f"{'...' if bad.size > 10 else ''}): constant map, no normal pixel, fewer than two "
            "points below the FPR limit, or all of them at FPR 0; the mean is NaN",
            RuntimeWarning,
            stacklevel=3,
        )
    return float(np.mean(values))

