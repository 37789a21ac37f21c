"""Tiling a large image into the model's input and stitching the tiles' maps back.

A 5-20 megapixel inspection image resized to the model's input (256² by default) shrinks a
6-pixel scratch below one pixel. Tiling keeps the image's resolution: square tiles of
``size`` pixels are cut every ``stride`` pixels (the last tile of a row or column is moved back
to end at the image's edge, so the grid covers the image exactly, whatever its size), each tile
is scored as one image of the model's input size, and the tiles' anomaly maps are stitched into
one map at the image's full resolution.

Stitching is a weighted sum. Along each axis a tile's window is a trapezoid that rises over the
overlap ``size - stride`` and is 1 in between (1 everywhere without overlap); at each pixel the
windows of the tiles covering it are divided by their sum, computed in float64. Because the grid
is a product of its rows and columns, the 2-D weight of a tile is the product of its two axis
weights, and the weights of the tiles covering any pixel sum to one. Where one tile alone covers
a pixel its weight is exactly 1, so there the stitched map is the tile's map, bit for bit. Where
tiles overlap, each tile's border (where its convolutions saw padding and its blur reflected)
weighs least, which is what keeps seams out of a normal image's map.

This module knows nothing of models: :func:`tiled_maps` takes any forward ``(B, 3, h, w) ->
(scores, maps)``. Memory: the image as it was decoded (uint8: 3 bytes a pixel), one float32
canvas (4 bytes a pixel) and one batch of tiles, whatever the image's size (measured at 144
megapixels: docs/CLI.md).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from .errors import ArgumentError
from .validation import is_int

if TYPE_CHECKING:  # torch only where tiles are scored by a network; the geometry is numpy's
    import torch

__all__ = ["Tiling", "tiling_of", "axis_starts", "axis_weights", "Stitcher", "tiled_maps", "tile_crops",
           "seam_ratio", "default_stride"]


def default_stride(size: int) -> int:
    """The stride when none is given: tiles overlap by a quarter of their size, enough for the
    blend to fade each tile's border (the reach of its padding and blur) into its neighbour's
    interior."""
    return max(1, size - size // 4)


@dataclass(frozen=True)
class Tiling:
    """Square tiles of ``size`` pixels every ``stride`` pixels (1 <= stride <= size), cut from
    the image at its own resolution and each scored at the model's input size."""

    size: int
    stride: int

    def __post_init__(self):
        if not is_int(self.size) or self.size < 1:
            raise ArgumentError("tile_size", f"must be an int >= 1 (pixels of the full-resolution image), got {self.size!r}")
        if not is_int(self.stride) or self.stride < 1:
            raise ArgumentError("tile_stride", f"must be an int >= 1 (0 would never move the tile), got {self.stride!r}")
        if self.stride > self.size:
            raise ArgumentError("tile_stride", f"{self.stride} is larger than the tile size {self.size}: the pixels "
                                "between two tiles would never be scored (use a stride <= the tile size)")

    def to_dict(self) -> dict:
        return {"size": int(self.size), "stride": int(self.stride)}

    def check_image(self, h: int, w: int, what: str = "the image") -> None:
        """An :class:`ArgumentError` naming ``tile_size`` when a tile does not fit in an ``h`` x ``w`` image."""
        if not self.fits(h, w):
            raise ArgumentError("tile_size", f"{self.size} is larger than {what} ({w}x{h} pixels): use a tile size "
                                f"<= {min(h, w)}, or no tiling")

    def fits(self, h: int, w: int) -> bool:
        """Whether a tile fits in an ``h`` x ``w`` image."""
        return self.size <= h and self.size <= w

    def too_small(self, h: int, w: int) -> str:
        """Why an ``h`` x ``w`` image cannot be tiled: what an error row or a warning says."""
        return (f"the image is {w}x{h} pixels, smaller than the model's {self.size}x{self.size} tiles: "
                f"at least {self.size}x{self.size} is needed")

    def grid(self, h: int, w: int) -> list[tuple[int, int]]:
        """The tiles' top-left corners (y, x), row by row."""
        self.check_image(h, w)
        return [(y, x) for y in axis_starts(h, self.size, self.stride) for x in axis_starts(w, self.size, self.stride)]

    def count(self, h: int, w: int) -> int:
        return len(self.grid(h, w))


def tiling_of(size, stride=None) -> Tiling | None:
    """The :class:`Tiling` of the options ``tile_size`` and ``tile_stride`` (None: no tiling;
    a stride without a size is refused; no stride: :func:`default_stride`)."""
    if size is None:
        if stride is not None:
            raise ArgumentError("tile_stride", "needs a tile size (tile_size) to go with it")
        return None
    return Tiling(size, default_stride(size) if stride is None and is_int(size) and size >= 1 else stride)


def axis_starts(length: int, size: int, stride: int) -> list[int]:
    """Where the tiles start along an axis of ``length`` pixels: 0, stride, 2 stride, ... and a
    last one ending at the edge (``length - size``), without repeats."""
    if size > length:
        raise ArgumentError("tile_size", f"{size} is larger than the image side of {length} pixels")
    starts = list(range(0, length - size + 1, stride))
    if starts[-1] != length - size:
        starts.append(length - size)
    return starts


def _window(size: int, ramp: int) -> np.ndarray:
    """A tile's window along one axis: rises over ``ramp`` pixels from 0.5/ramp to 1, flat in
    the middle, falls the same way (all ones when ``ramp`` is 0)."""
    j = np.arange(size, dtype=np.float64)
    if ramp <= 0:
        return np.ones(size)
    return np.minimum(1.0, np.minimum(j + 0.5, size - j - 0.5) / ramp)


def axis_weights(length: int, size: int, stride: int) -> tuple[list[int], np.ndarray]:
    """(starts, weights (n, size) float32): each tile's blend weight along an axis. At every
    pixel the weights of the tiles covering it sum to one (in float64, before the rounding to
    float32); where one tile covers a pixel its weight is exactly 1."""
    starts = axis_starts(length, size, stride)
    win = _window(size, size - stride)
    total = np.zeros(length)
    for s in starts:
        total[s:s + size] += win
    weights = np.stack([win / total[s:s + size] for s in starts])
    # A pixel one tile covers: win / win, exactly 1 in float64 and so in float32.
    return starts, weights.astype(np.float32)


class Stitcher:
    """Accumulates tile maps (``size`` x ``size`` each) into one (h, w) float32 map on
    ``device``: ``add(maps, corners)`` for each batch, then :attr:`map`. (A deployment without
    torch stitches by the same weights in numpy: :mod:`ckaad_fast.deployment`.)"""

    def __init__(self, h: int, w: int, tiling: Tiling, device="cpu"):
        import torch

        tiling.check_image(h, w)
        self.tiling = tiling
        ys, wy = axis_weights(h, tiling.size, tiling.stride)
        xs, wx = axis_weights(w, tiling.size, tiling.stride)
        self._wy = {s: torch.from_numpy(wy[i]).to(device) for i, s in enumerate(ys)}
        self._wx = {s: torch.from_numpy(wx[i]).to(device) for i, s in enumerate(xs)}
        self.map = torch.zeros((h, w), dtype=torch.float32, device=device)

    def add(self, maps: torch.Tensor, corners: list[tuple[int, int]]) -> None:
        s = self.tiling.size
        for m, (y, x) in zip(maps, corners):
            wy, wx = self._wy[y], self._wx[x]
            self.map[y:y + s, x:x + s].addcmul_(wy[:, None] * wx[None, :], m.to(self.map.dtype))


def tile_crops(image: torch.Tensor, tiling: Tiling, batch: int) -> Iterator[tuple[list[tuple[int, int]], torch.Tensor]]:
    """The tiles of a (3, H, W) image, ``batch`` at a time: (corners, (n, 3, size, size))."""
    import torch

    h, w = image.shape[-2:]
    corners = tiling.grid(h, w)
    s = tiling.size
    for i in range(0, len(corners), batch):
        part = corners[i:i + batch]
        yield part, torch.stack([image[:, y:y + s, x:x + s] for y, x in part])


def tiled_maps(image: torch.Tensor, tiling: Tiling, input_size: tuple[int, int],
               forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               prepare: Callable[[torch.Tensor], torch.Tensor] = lambda t: t, batch: int = 16,
               device=None) -> torch.Tensor:
    """The stitched (H, W) float32 anomaly map of one (3, H, W) ``image``: its tiles, ``batch``
    at a time, through ``prepare`` (device, normalisation, layout), resized to the model's
    ``input_size`` when the tile size differs (bilinear, antialiased), through ``forward``
    (whose maps are resized back to the tile's size, bilinear), blended into the canvas on
    ``device`` (default: the forward's device)."""
    import torch
    import torch.nn.functional as F

    h, w = image.shape[-2:]
    stitcher = None
    size = (tiling.size, tiling.size)
    for corners, tiles in tile_crops(image, tiling, batch):
        x = tiles
        if size != tuple(input_size):
            # Raw uint8 pixels become [0, 1] floats, which ``prepare`` normalises like any image's.
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            x = F.interpolate(x, size=tuple(input_size), mode="bilinear", align_corners=False, antialias=True)
        x = prepare(x)
        _, maps = forward(x)
        maps = maps.float()
        if tuple(maps.shape[-2:]) != size:
            maps = F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
        if stitcher is None:
            stitcher = Stitcher(h, w, tiling, maps.device if device is None else device)
        stitcher.add(maps, corners)
    return stitcher.map


def seam_ratio(stitched: np.ndarray, tiling: Tiling) -> float:
    """How much a stitched map jumps across the tiles' borders, against how much it varies
    inside them: the mean absolute difference between neighbouring pixels on either side of a
    tile's edge, over the same mean for every other pair of neighbours. About 1 when no seam
    shows; well above 1 when each tile's border stands out."""
    m = np.asarray(stitched, dtype=np.float64)
    h, w = m.shape
    dy, dx = np.abs(np.diff(m, axis=0)), np.abs(np.diff(m, axis=1))
    s = tiling.size
    # A difference between rows r-1 and r crosses an edge where a tile starts at r or ends at r.
    edges_y = sorted({e for t in axis_starts(h, s, tiling.stride) for e in (t, t + s) if 0 < e < h})
    edges_x = sorted({e for t in axis_starts(w, s, tiling.stride) for e in (t, t + s) if 0 < e < w})
    on_y = np.zeros(h - 1, bool)
    on_y[[e - 1 for e in edges_y]] = True
    on_x = np.zeros(w - 1, bool)
    on_x[[e - 1 for e in edges_x]] = True
    across = np.concatenate([dy[on_y].ravel(), dx[:, on_x].ravel()])
    inside = np.concatenate([dy[~on_y].ravel(), dx[:, ~on_x].ravel()])
    if across.size == 0 or inside.size == 0:
        return 1.0
    return float(across.mean() / max(inside.mean(), 1e-30))
