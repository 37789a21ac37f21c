"""Defect regions: where in an image the anomaly map crosses a pixel threshold, as a production
line reports them. Each region is one 8-connected component of ``map >= threshold`` with its box,
its area in pixels and the peak and mean of the map over it. numpy and scipy only: the scoring
paths with and without PyTorch find the same regions in the same map."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

__all__ = ["Region", "find_regions", "regions_to_text", "regions_from_text", "draw_boxes"]

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Region:
    """One region: its box ``[x0, x1) x [y0, y1)`` in map pixels, ``area`` (pixels), and the
    ``peak`` and ``mean`` of the map over it."""

    x0: int
    y0: int
    x1: int
    y1: int
    area: int
    peak: float
    mean: float


def find_regions(amap, threshold: float) -> list[Region]:
    """The regions of a (H, W) map at ``threshold``, highest peak first (ties: top-left first).
    Non-finite map values belong to no region."""
    amap = np.asarray(amap)
    if amap.ndim != 2:
        raise ValueError(f"amap must be (H, W), got shape {amap.shape}")
    with np.errstate(invalid="ignore"):
        inside = np.isfinite(amap) & (amap >= threshold)
    labels, n = ndimage.label(inside, structure=_EIGHT)
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    values = amap.astype(np.float64)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    peaks = ndimage.maximum(values, labels, index)
    means = ndimage.mean(values, labels, index)
    regions = [Region(int(box[1].start), int(box[0].start), int(box[1].stop), int(box[0].stop), int(area),
                      float(np.float32(peak)), float(mean))
               for box, area, peak, mean in zip(ndimage.find_objects(labels), areas, peaks, means)]
    return sorted(regions, key=lambda r: (-r.peak, r.y0, r.x0))


def regions_to_text(regions: list[Region]) -> str:
    """Regions as compact JSON (a list of objects), as a results file stores them."""
    return json.dumps([asdict(r) for r in regions], separators=(",", ":"))


def regions_from_text(text: str) -> list[Region]:
    return [Region(**r) for r in json.loads(text)] if text else []


def draw_boxes(image: np.ndarray, regions: list[Region], colour=(255, 255, 255)) -> np.ndarray:
    """``image`` (H, W, 3) uint8 with each region's box outlined, one pixel wide (a copy)."""
    out = np.array(image, copy=True)
    h, w = out.shape[:2]
    for r in regions:
        x0, y0, x1, y1 = max(r.x0, 0), max(r.y0, 0), min(r.x1, w) - 1, min(r.y1, h) - 1
        if x1 < x0 or y1 < y0:
            continue
        out[y0, x0:x1 + 1] = colour
        out[y1, x0:x1 + 1] = colour
        out[y0:y1 + 1, x0] = colour
        out[y0:y1 + 1, x1] = colour
    return out
