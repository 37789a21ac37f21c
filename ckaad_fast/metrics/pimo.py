"""AUPIMO: the area under the per-image overlap (PIMO) curve at very low false-positive rates.

The definition (Bertoldo et al., "AUPIMO: redefining visual anomaly detection benchmarks with high
speed and low tolerance", 2024), as the best-known peer library computes it:

- the thresholds are ``num_thresholds`` evenly spaced values from the smallest to the largest
  anomaly-map value of the *normal* images (images whose mask is empty), in the maps' dtype;
  a pixel is predicted anomalous when its value is ``>= threshold``;
- the shared false-positive rate at a threshold is the mean, over normal images, of the fraction
  of each one's pixels predicted anomalous (all its pixels are negatives);
- an anomalous image's overlap (its TPR) at a threshold is the fraction of its mask's pixels
  predicted anomalous;
- the integration range is the thresholds whose shared FPR is closest to the bounds
  ``fpr_bounds`` (1e-5 and 1e-4 by default); the PIMO curve of an anomalous image is its overlap
  against ``log(shared FPR)`` there, points with a zero FPR left out; AUPIMO is the trapezoidal
  area divided by ``log(upper / lower)``, clipped to [0, 1]: the image's mean overlap over the
  range on a log scale. Fewer than 31 points in the range is refused (``force=True`` computes it
  anyway), as the peer library does.

Normal images get no AUPIMO (NaN): it measures how much of a defect is found while almost no
normal pixel is flagged. Computed with one sort of the normal pixels (all normal images have
the same number of pixels, so the mean of their rates is the pooled rate) and one sort per
anomalous image, evaluated only inside the integration range: memory O(pixels + range), where a
dense count table of images x thresholds would take gigabytes at 300,000 thresholds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .inputs import pixel_inputs

__all__ = ["aupimo", "AupimoResult", "AUPIMO_FPR_BOUNDS", "AUPIMO_NUM_THRESHOLDS"]

#: The shared false-positive rates AUPIMO integrates between (the definition's default).
AUPIMO_FPR_BOUNDS = (1e-5, 1e-4)
#: How many thresholds span the normal images' values (the definition's default).
AUPIMO_NUM_THRESHOLDS = 300_000
_MIN_POINTS = 30


@dataclass(frozen=True)
class AupimoResult:
    """``per_image`` (N,) float64: each anomalous image's AUPIMO, NaN for normal images; ``mean``:
    their mean over anomalous images; ``num_points``: thresholds inside the integration range;
    ``fpr_bounds_reached``: the shared FPRs at the range's two ends."""

    per_image: np.ndarray
    mean: float
    num_points: int
    fpr_bounds_reached: tuple[float, float]


def _check_bounds(fpr_bounds) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in fpr_bounds)
    except (TypeError, ValueError):
        raise ValueError(f"fpr_bounds must be two rates (lower, upper), got {fpr_bounds!r}") from None
    if not 0 < lo < hi <= 1:
        raise ValueError(f"fpr_bounds must satisfy 0 < lower < upper <= 1, got {fpr_bounds!r}")
    return lo, hi


def _closest(shared_fpr: np.ndarray, level: float) -> int:
    """The first threshold index whose shared FPR is closest to ``level``."""
    return int(np.argmin(np.abs(shared_fpr - level)))


def aupimo(masks, maps, *, num_thresholds: int = AUPIMO_NUM_THRESHOLDS, fpr_bounds=AUPIMO_FPR_BOUNDS,
           force: bool = False) -> AupimoResult:
    """AUPIMO of every image (see the module). ``masks`` and ``maps``: (N, H, W); at least one
    normal image (empty mask) and one anomalous image are needed, and the normal images must
    reach the lower FPR bound (about ``1 / lower`` normal pixels)."""
    lo, hi = _check_bounds(fpr_bounds)
    if isinstance(num_thresholds, bool) or not isinstance(num_thresholds, int) or num_thresholds < 2:
        raise ValueError(f"num_thresholds must be an int >= 2, got {num_thresholds!r}")
    m, a = pixel_inputs(masks, maps)
    anomalous = m.reshape(m.shape[0], -1).any(axis=1)
    if anomalous.all() or not anomalous.any():
        raise ValueError(f"AUPIMO needs normal images (empty masks) and anomalous ones; got {int(anomalous.sum())} "
                         f"anomalous of {anomalous.size}")
    flat = a.reshape(a.shape[0], -1)
    normal_sorted = np.sort(flat[~anomalous].reshape(-1))
    thresholds = np.linspace(float(normal_sorted[0]), float(normal_sorted[-1]), num_thresholds).astype(a.dtype)
    # Pooled over the normal pixels: the count at or above each threshold, descending in it.
    shared_fpr = (normal_sorted.size - np.searchsorted(normal_sorted, thresholds, side="left")) / normal_sorted.size
    if not shared_fpr.min() <= lo or not hi <= shared_fpr.max():
        raise ValueError(f"the normal images' pixels cannot reach a shared false-positive rate of {lo:g} "
                         f"({normal_sorted.size} normal pixels; about {math.ceil(1 / lo)} are needed)")
    start, stop = _closest(shared_fpr, hi), _closest(shared_fpr, lo)  # thresholds ascend, rates descend
    if start >= stop:
        raise ValueError(f"the FPR bounds {fpr_bounds} fall on the same threshold: raise num_thresholds")
    fpr = shared_fpr[start:stop + 1][::-1]
    keep = fpr > 0  # log(0) has no place on the curve
    log_fpr = np.log(fpr[keep])
    points = int(log_fpr.size)
    if points <= _MIN_POINTS and not force:
        raise ValueError(f"only {points} thresholds inside the FPR range: raise num_thresholds (or force=True)")
    window = thresholds[start:stop + 1][::-1][keep]
    per_image = np.full(a.shape[0], np.nan)
    for i in np.flatnonzero(anomalous):
        inside = np.sort(flat[i][m[i].reshape(-1)])
        tpr = (inside.size - np.searchsorted(inside, window, side="left")) / inside.size
        per_image[i] = np.trapezoid(tpr, x=log_fpr) if points > 1 else 0.0
    per_image[anomalous] = np.clip(per_image[anomalous] / math.log(hi / lo), 0.0, 1.0)
    reached = (float(shared_fpr[stop]), float(shared_fpr[start]))
    return AupimoResult(per_image, float(np.mean(per_image[anomalous])), points, reached)
