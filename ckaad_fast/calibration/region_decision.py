"""An image decision on regions, calibrated at an image-level false-positive rate.

The default image score, the mean of a map's top-k values, asks how high the map's highest
pixels are. On a megapixel image a small defect and the most unusual of a million normal
pixels can be equally high; what may still tell them apart is their extent. This rule looks at
the map's *regions* (:func:`ckaad_fast.regions.find_regions`: the 8-connected parts of ``map >=
pixel threshold``) and scores an image by the largest *excess mass* among them, the sum of ``map -
pixel threshold`` over a region (so both its height and its area count); an image without a
region scores 0.

:func:`calibrate_region_decision` picks both thresholds from normal maps alone (a calibration
set, not the training images): the pixel threshold at ``pixel_fpr`` of their pixels, then the
image threshold at ``target_fpr`` of their region scores, by the same rule as every other
calibration (:func:`.thresholds.threshold_at_fpr`: at most
k = floor(target_fpr n) of the n normal maps lie above it). Normal images being exchangeable, a
fresh one then lies above it with probability at most (k + 1) / (n + 1) (5.9% for 5% of 100), and
the share flagged among m fresh images spreads around that by the binomial margin of m draws and
the set's own sampling.

numpy and scipy only, like the regions: any path that has the map can decide.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .thresholds import PIXEL_FPR, pixel_threshold_at_fpr, threshold_at_fpr
from ..errors import ArgumentError
from ..regions import find_regions

__all__ = ["RegionDecision", "region_score", "calibrate_region_decision"]


def region_score(amap, pixel_threshold: float) -> float:
    """The largest excess mass among the regions of ``amap`` at ``pixel_threshold``: the sum of
    ``map - pixel_threshold`` over a region's pixels (0.0 when no pixel reaches the threshold)."""
    regions = find_regions(amap, pixel_threshold)
    return max(((r.mean - pixel_threshold) * r.area for r in regions), default=0.0)


@dataclass(frozen=True)
class RegionDecision:
    """The two thresholds of a region decision (see the module) and what they were picked on."""

    pixel_threshold: float
    image_threshold: float
    target_fpr: float
    pixel_fpr: float
    num_normal: int

    def score(self, amap) -> float:
        return region_score(amap, self.pixel_threshold)

    def decide(self, amap) -> bool:
        """True when ``amap`` is anomalous: its region score at or above the image threshold."""
        return self.score(amap) >= self.image_threshold

    def to_dict(self) -> dict:
        return {"pixel_threshold": self.pixel_threshold, "image_threshold": self.image_threshold,
                "target_fpr": self.target_fpr, "pixel_fpr": self.pixel_fpr, "num_normal": self.num_normal}

    @classmethod
    def from_dict(cls, d: dict) -> RegionDecision:
        return cls(float(d["pixel_threshold"]), float(d["image_threshold"]), float(d["target_fpr"]),
                   float(d["pixel_fpr"]), int(d["num_normal"]))


def calibrate_region_decision(normal_maps, target_fpr: float, pixel_fpr: float = PIXEL_FPR) -> RegionDecision:
    """Both thresholds from ``normal_maps`` (N, H, W) of normal images (or a sequence of (H, W)
    maps of any sizes): the pixel threshold at ``pixel_fpr`` of all their pixels, the image
    threshold at ``target_fpr`` of their region scores."""
    maps = [np.asarray(m, dtype=np.float32) for m in normal_maps]
    if not maps:
        raise ArgumentError("normal_maps", "is empty: a region decision is calibrated on normal maps")
    if any(m.ndim != 2 for m in maps):
        raise ArgumentError("normal_maps", "must be (H, W) maps")
    if not all(np.isfinite(m).all() for m in maps):
        raise ArgumentError("normal_maps", "hold values that are not finite: a normal map must be finite to calibrate on")
    if not (isinstance(target_fpr, (int, float)) and 0 < target_fpr < 1):
        raise ArgumentError("target_fpr", f"must lie in (0, 1), got {target_fpr!r}")
    if not (isinstance(pixel_fpr, (int, float)) and 0 < pixel_fpr < 1):
        raise ArgumentError("pixel_fpr", f"must lie in (0, 1), got {pixel_fpr!r}")
    pixels = sum(m.size for m in maps)
    need = int(pixel_fpr * pixels) + 1
    # Each map's largest ``need`` values hold the largest ``need`` of them all.
    top = np.concatenate([np.partition(m.ravel(), m.size - min(need, m.size))[m.size - min(need, m.size):]
                          for m in maps])
    pixel_threshold = pixel_threshold_at_fpr(np.sort(top)[::-1], pixels, pixel_fpr)
    # The normal maps also set the pixel threshold their region scores are measured at; scoring
    # each at the threshold of the others instead changed the rate on fresh maps by 0.1% of
    # images in 10,000 (5.4% against 5.5% at a 5% target), so the simpler rule stands.
    scores = [region_score(m, pixel_threshold) for m in maps]
    return RegionDecision(pixel_threshold, threshold_at_fpr(scores, target_fpr), float(target_fpr),
                          float(pixel_fpr), len(maps))
