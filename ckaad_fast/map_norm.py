"""Normalising anomaly maps by the statistics of normal maps.

A model's map of a normal image is not equally high everywhere: on an aligned object the edges
of holes and grooves answer more than flat metal, and a tiled model's map carries the pattern of
its tiles. A defect on a quiet place can then score below the normal response of a busy one. A
*per-position* normalisation divides that out: from the maps of normal images, each place gets
the normal maps' mean and spread, and a map becomes ``(map - mean) / spread``: how unusual each
pixel is *for its place*. Which normal images: for a score read off the normalised map, a set
kept apart from training (the training images' maps are too low); for picking where a tiled
model's feature memory looks (:meth:`ckaad_fast.model.Detector.memory_map`), the training images'
own maps do almost as well (#36, docs/BENCHMARKS.md), and they are what a checkpoint has.

The statistics are kept on a grid of ``cell`` x ``cell`` pixel cells, not per pixel: a per-pixel
spread from a few dozen maps is too noisy (its own extremes would become the map's largest
values), while a cell pools ``cell²`` pixels of every map; and a 20-megapixel model would
otherwise store 160 MB. Inside a cell the mean is the average of the per-pixel means, the spread
the root of the average per-pixel variance around them, so a busy edge crossing a cell does not
inflate it. Applied, the grid is enlarged bilinearly to the map (so a map of another size is
normalised by the same relative positions, as for a resized object).

A *global* normalisation (one mean and spread for the whole map) is a monotone function of the
map: it changes no image's rank and no AUROC, and a calibration's thresholds absorb it. It is
not offered.

numpy only: the scoring paths with and without PyTorch normalise the same maps alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ArgumentError
from .validation import is_int

__all__ = ["MapNormalization", "fit_map_normalization", "DEFAULT_CELL"]

#: Pixels per side of a statistics cell: small against a 1-megapixel object's parts (holes of
#: 60 pixels), large enough to pool 64 pixels of every normal map.
DEFAULT_CELL = 8
#: The least spread a cell may have, as a share of the median cell's: a cell where every normal
#: map was flat (a saturated corner) would otherwise turn any change into an extreme.
MIN_SPREAD_SHARE = 0.05


@dataclass(frozen=True)
class MapNormalization:
    """Per-position statistics of normal maps (see the module): ``mean`` and ``spread``, (gh, gw)
    float32 grids of ``cell``-pixel cells, fitted on maps of ``shape`` (H, W) from ``count``
    normal images."""

    cell: int
    shape: tuple[int, int]
    mean: np.ndarray
    spread: np.ndarray
    count: int

    def apply(self, maps) -> np.ndarray:
        """``(maps - mean) / spread`` for a (H, W) map or a (B, H, W) batch, float32; the grids
        enlarged bilinearly (cell centres, edges held) to the maps' size."""
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim not in (2, 3):
            raise ArgumentError("maps", f"must be (H, W) or (B, H, W), got shape {maps.shape}")
        h, w = maps.shape[-2:]
        mean, spread = (_enlarge(g, h, w) for g in (self.mean, self.spread))
        return ((maps - mean) / spread).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        """Plain numbers (what a checkpoint or a calibration record stores)."""
        return {"cell": int(self.cell), "shape": [int(v) for v in self.shape], "count": int(self.count),
                "mean": self.mean.astype(np.float32).tolist(), "spread": self.spread.astype(np.float32).tolist()}

    @classmethod
    def from_dict(cls, d: dict) -> MapNormalization:
        mean = np.asarray(d["mean"], dtype=np.float32)
        spread = np.asarray(d["spread"], dtype=np.float32)
        if mean.ndim != 2 or mean.shape != spread.shape or not (spread > 0).all():
            raise ValueError("a map normalisation needs two grids of one shape, its spreads > 0")
        return cls(int(d["cell"]), tuple(int(v) for v in d["shape"]), mean, spread, int(d["count"]))


def fit_map_normalization(maps, cell: int = DEFAULT_CELL) -> MapNormalization:
    """The per-position statistics of ``maps`` (N, H, W), the maps of N >= 2 normal images of one
    size (see the module for what a cell holds)."""
    maps = np.asarray(maps)
    if maps.ndim != 3 or maps.shape[0] < 2:
        raise ArgumentError("maps", f"must be (N, H, W) with N >= 2 normal maps, got shape {maps.shape}")
    if not is_int(cell) or cell < 1:
        raise ArgumentError("cell", f"must be an int >= 1 (pixels per side), got {cell!r}")
    if not np.isfinite(maps).all():
        raise ArgumentError("maps", "hold values that are not finite: a normal map must be finite to fit statistics")
    n, h, w = maps.shape
    per_pixel_mean = np.zeros((h, w))
    for m in maps:  # one map at a time in float64: N maps of a megapixel stay in their own dtype
        per_pixel_mean += m
    per_pixel_mean /= n
    per_pixel_var = np.zeros((h, w))
    for m in maps:
        per_pixel_var += (m - per_pixel_mean) ** 2
    per_pixel_var /= n - 1
    mean = _cells(per_pixel_mean, cell)
    spread = np.sqrt(_cells(per_pixel_var, cell))
    floor = MIN_SPREAD_SHARE * max(float(np.median(spread)), 1e-12)
    spread = np.maximum(spread, floor)
    return MapNormalization(int(cell), (int(h), int(w)), mean.astype(np.float32), spread.astype(np.float32), int(n))


def _cells(a: np.ndarray, cell: int) -> np.ndarray:
    """The mean of ``a`` over each cell x cell block (the last row and column of blocks may be short)."""
    h, w = a.shape
    gh, gw = -(-h // cell), -(-w // cell)
    sums = np.add.reduceat(np.add.reduceat(a, np.arange(0, h, cell), axis=0), np.arange(0, w, cell), axis=1)
    rows = np.minimum(np.arange(1, gh + 1) * cell, h) - np.arange(gh) * cell
    cols = np.minimum(np.arange(1, gw + 1) * cell, w) - np.arange(gw) * cell
    return sums / (rows[:, None] * cols[None, :])


def _enlarge(grid: np.ndarray, h: int, w: int) -> np.ndarray:
    """A (gh, gw) grid of cell values enlarged bilinearly to (h, w): each cell's value sits at its
    centre, pixels between centres are interpolated, pixels beyond the outer centres take the
    nearest one. float32."""
    gh, gw = grid.shape
    ys = _coordinates(h, gh)
    xs = _coordinates(w, gw)
    y0, fy = np.floor(ys).astype(int), (ys - np.floor(ys))[:, None]
    x0, fx = np.floor(xs).astype(int), (xs - np.floor(xs))[None, :]
    y1, x1 = np.minimum(y0 + 1, gh - 1), np.minimum(x0 + 1, gw - 1)
    g = grid.astype(np.float64)
    top = g[y0][:, x0] * (1 - fx) + g[y0][:, x1] * fx
    bottom = g[y1][:, x0] * (1 - fx) + g[y1][:, x1] * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def _coordinates(n: int, g: int) -> np.ndarray:
    """Where each of ``n`` pixel centres falls on a grid of ``g`` cell centres spread over the
    same extent, clamped to [0, g - 1]."""
    return np.clip((np.arange(n) + 0.5) * (g / n) - 0.5, 0.0, g - 1.0)
