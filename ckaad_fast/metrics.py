"""Exact, fast anomaly-detection metrics (numpy and scipy only).

Image level
    :func:`image_auroc` is the Mann-Whitney AUROC (ties count one half), equal to
    ``sklearn.metrics.roc_auc_score``. :func:`image_f1_acc` is the best F1 over the thresholds of
    ``sklearn.metrics.precision_recall_curve`` and the accuracy at that threshold, as the CKAAD
    reference code computes them.

Pixel level
    :func:`pixel_auroc` is the AUROC over all pixels of all images. :func:`aupro` is the standard
    (MVTec AD) normalised area under the per-region-overlap curve up to a false-positive rate,
    computed exactly over every distinct threshold. :func:`aupro_per_image` is the CKAAD / RD4AD
    reference-code protocol: 200 evenly spaced thresholds per anomalous image, averaged over
    images. The two AUPRO numbers are different metrics and are not comparable with each other.

:func:`evaluate` computes all of them at once.

Every function takes numpy arrays or CPU torch tensors. Labels and scores have shape ``(N,)``;
masks and maps have shape ``(N, H, W)`` (``(N, 1, H, W)`` is accepted too). Masks are binary,
of any dtype. Scores and maps must be finite.
"""
from __future__ import annotations

import sys
import warnings

import numpy as np
from scipy import ndimage

__all__ = [
    "image_auroc",
    "image_f1_acc",
    "pixel_auroc",
    "aupro",
    "aupro_per_image",
    "evaluate",
]

# 8-connectivity inside one image and none across images, so that one call labels a whole batch
# exactly as skimage.measure.label (default connectivity for 2-D) labels each image on its own.
_STRUCTURE_3D = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE_3D[1] = True


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------
def _to_numpy(x, name: str) -> np.ndarray:
    # torch is looked up, not imported, so that the metrics work (and import fast) without it.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype == torch.bfloat16:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # pragma: no cover - depends on the foreign object
        raise ValueError(f"{name} must be array-like, got {type(x).__name__}") from exc
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must hold numbers or booleans, got dtype {arr.dtype}")
    return arr


def _check_binary(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        return arr
    if not np.all((arr == 0) | (arr == 1)):
        bad = np.unique(arr[(arr != 0) & (arr != 1)])[:5]
        raise ValueError(f"{name} must be binary (0/1 or bool), found values such as {bad.tolist()}")
    return arr != 0


def _check_finite(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype == bool:
        arr = arr.astype(np.float64)
    elif arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite; it holds NaN or infinite values")
    return arr


def _image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    y = _to_numpy(labels, "labels")
    s = _to_numpy(scores, "scores")
    if y.ndim != 1 or s.ndim != 1:
        raise ValueError(
            f"labels and scores must be 1-D of shape (N,), got labels.shape={y.shape} "
            f"and scores.shape={s.shape}"
        )
    if y.shape != s.shape:
        raise ValueError(
            f"labels and scores must have the same length, got labels.shape={y.shape} "
            f"and scores.shape={s.shape}"
        )
    if y.size == 0:
        raise ValueError("labels and scores are empty")
    y = _check_binary(y, "labels")
    s = _check_finite(s, "scores")
    n_pos = int(np.count_nonzero(y))
    if n_pos == 0 or n_pos == y.size:
        raise ValueError(
            f"labels must contain both classes (0 and 1), got {n_pos} positives of {y.size}; "
            "the metric is undefined"
        )
    return y, s


def _pixel_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    m = _to_numpy(masks, "masks")
    a = _to_numpy(maps, "maps")
    # (N, 1, H, W) is what segmentation data loaders and models usually produce.
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if m.ndim != 3 or a.ndim != 3:
        raise ValueError(
            f"masks and maps must have shape (N, H, W), got masks.shape={m.shape} "
            f"and maps.shape={a.shape}"
        )
    if m.shape != a.shape:
        raise ValueError(
            f"masks and maps must have the same shape, got masks.shape={m.shape} "
            f"and maps.shape={a.shape}"
        )
    if m.size == 0:
        raise ValueError(f"masks and maps are empty (shape {m.shape})")
    return _check_binary(m, "masks"), _check_finite(a, "maps")


def _require_both_pixel_classes(m: np.ndarray) -> int:
    n_pos = int(np.count_nonzero(m))
    if n_pos == 0:
        raise ValueError("masks has no anomalous pixel; the metric is undefined")
    if n_pos == m.size:
        raise ValueError("masks has no normal pixel; the false-positive rate is undefined")
    return n_pos


def _check_fpr_limit(fpr_limit: float) -> float:
    fpr_limit = float(fpr_limit)
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must lie in (0, 1], got {fpr_limit}")
    return fpr_limit


# --------------------------------------------------------------------------------------------
# AUROC
# --------------------------------------------------------------------------------------------
def _auroc(y: np.ndarray, s: np.ndarray) -> float:
    return _auroc_sorted_negatives(np.sort(s[~y], axis=None), s[y])


def _auroc_sorted_negatives(neg: np.ndarray, pos: np.ndarray) -> float:
    # Mann-Whitney: AUC = P(s_pos > s_neg) + 1/2 P(s_pos == s_neg). Sorting each class and
    # counting with searchsorted keeps every count an exact integer (no trapezoid rounding), and
    # np.sort on plain values is several times faster than the argsort a rank-based or
    # roc_curve-based computation needs.
    pos = np.sort(pos, axis=None)  # sorted keys make searchsorted walk memory in order
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    twice_u = int(below.sum(dtype=np.int64)) + int(at_or_below.sum(dtype=np.int64))
    return twice_u / (2.0 * pos.size * neg.size)


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores.

    ``AUROC = (1 / (n1 n0)) * sum_{i: y_i=1} sum_{j: y_j=0} ([s_i > s_j] + 1/2 [s_i = s_j])``,
    the Mann-Whitney U statistic normalised by ``n1 n0``, which equals
    ``sklearn.metrics.roc_auc_score(labels, scores)`` (ties included).

    Args:
        labels: ``(N,)`` binary, 1 = anomalous. Both classes must be present.
        scores: ``(N,)`` finite, higher = more anomalous.
    """
    y, s = _image_inputs(labels, scores)
    return _auroc(y, s)


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels of all images (flattened).

    Same formula as :func:`image_auroc` with every pixel a sample: ``masks`` are the labels and
    ``maps`` the scores. Exact (integer counting, ties count one half) and computed with one sort
    per class, so 100 maps of 256x256 take a fraction of a second.

    Args:
        masks: ``(N, H, W)`` binary ground truth.
        maps: ``(N, H, W)`` finite anomaly maps.
    """
    m, a = _pixel_inputs(masks, maps)
    _require_both_pixel_classes(m)
    return _auroc(m.ravel(), a.ravel())


# --------------------------------------------------------------------------------------------
# F1 and accuracy
# --------------------------------------------------------------------------------------------
def image_f1_acc(labels, scores) -> tuple[float, float, float]:
    """Best F1 over the precision-recall curve, and the accuracy at its threshold.

    The candidate thresholds are the distinct scores, as in
    ``sklearn.metrics.precision_recall_curve``; at threshold ``t`` a sample is predicted anomalous
    when ``score >= t``, giving precision ``P = TP / (TP + FP)`` and recall ``R = TP / n1``. The
    curve's extra end point ``(P, R) = (1, 0)`` has F1 0 and no threshold. With
    ``F1 = 2 P R / (P + R + 1e-16)``, the chosen threshold is the lowest one that maximises F1
    (the first maximum in sklearn's ascending order), and
    ``acc = mean([score >= threshold] == label)``. This is what the CKAAD reference code computes.

    Returns:
        ``(best_f1, acc, threshold)``.
    """
    y, s = _image_inputs(labels, scores)
    order = np.argsort(s, kind="stable")[::-1]
    s_desc = s[order]
    # One point per distinct score: the last sample of each run of equal scores (descending).
    last = np.flatnonzero(np.diff(s_desc) != 0)
    last = np.append(last, s_desc.size - 1)
    tps = np.cumsum(y[order], dtype=np.float64)[last]
    fps = (last + 1) - tps
    # Same float operations, in the same order, as sklearn and the reference code, so that
    # ties between F1 values break identically.
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    precision = np.append(precision[::-1], 1.0)
    recall = np.append(recall[::-1], 0.0)
    thresholds = s_desc[last][::-1]
    f1 = 2 * (precision * recall) / (precision + recall + 1e-16)
    best = int(np.argmax(f1))
    threshold = thresholds[best]
    acc = float(np.mean((s >= threshold) == y))
    return float(f1[best]), acc, float(threshold)


# --------------------------------------------------------------------------------------------
# AUPRO, standard definition
# --------------------------------------------------------------------------------------------
def _label_regions(m: np.ndarray) -> tuple[np.ndarray, int]:
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


def _aupro(
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
    fpr_limit = _check_fpr_limit(fpr_limit)
    m, a = _pixel_inputs(masks, maps)
    _require_both_pixel_classes(m)
    labels, n_regions = _label_regions(m)
    return _aupro(m, a, labels, n_regions, fpr_limit)


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


def _aupro_per_image_values(
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
    fpr_limit = _check_fpr_limit(fpr_limit)
    num_thresholds = _check_num_thresholds(num_thresholds)
    m, a = _pixel_inputs(masks, maps)
    if not m.any():
        raise ValueError("masks has no anomalous pixel; the metric is undefined")
    labels, _ = _label_regions(m)
    return _mean_per_image(_aupro_per_image_values(m, a, labels, num_thresholds, fpr_limit))


def _check_num_thresholds(num_thresholds: int) -> int:
    if isinstance(num_thresholds, bool) or int(num_thresholds) != num_thresholds or num_thresholds < 1:
        raise ValueError(f"num_thresholds must be a positive integer, got {num_thresholds!r}")
    return int(num_thresholds)


def _mean_per_image(result: tuple[np.ndarray, np.ndarray]) -> float:
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


# --------------------------------------------------------------------------------------------
# Everything at once
# --------------------------------------------------------------------------------------------
def evaluate(
    labels,
    scores,
    masks=None,
    maps=None,
    *,
    fpr_limit: float = 0.3,
    num_thresholds: int = 200,
) -> dict[str, float]:
    """All metrics: image AUROC, F1 and accuracy, and, given masks and maps, the pixel metrics.

    Returns a dict with ``image_auroc``, ``image_f1``, ``image_acc`` and, when ``masks`` and
    ``maps`` are given, ``pixel_auroc``, ``aupro`` (standard definition, :func:`aupro`) and
    ``aupro_per_image`` (reference protocol, :func:`aupro_per_image`). Inputs are validated and
    regions labelled once for all pixel metrics.
    """
    out: dict[str, float] = {"image_auroc": image_auroc(labels, scores)}
    f1, acc, _ = image_f1_acc(labels, scores)
    out["image_f1"], out["image_acc"] = f1, acc
    if (masks is None) != (maps is None):
        raise ValueError("masks and maps must be given together")
    if masks is not None:
        fpr_limit = _check_fpr_limit(fpr_limit)
        num_thresholds = _check_num_thresholds(num_thresholds)
        m, a = _pixel_inputs(masks, maps)
        _require_both_pixel_classes(m)
        region_labels, n_regions = _label_regions(m)
        # One sort of the normal pixels serves both the pixel AUROC and the standard AUPRO.
        normal_sorted = np.sort(a[~m])
        out["pixel_auroc"] = _auroc_sorted_negatives(normal_sorted, a[m])
        out["aupro"] = _aupro(m, a, region_labels, n_regions, fpr_limit, normal_sorted)
        out["aupro_per_image"] = _mean_per_image(
            _aupro_per_image_values(m, a, region_labels, num_thresholds, fpr_limit)
        )
    return out
