"""A memory of normal features that checks a map's strongest places: the image decision of #36.

On a megapixel image a 4-10 px defect is among the highest places of a tiled model's map, but a
normal image of a million pixels has places as high: the auto-encoder's rarest misses on normal
texture look, in the map, like its answer to a defect. They do not look like a defect in the
*features*: each such place has a close neighbour among the features of the normal training
images, and a defect has none. So the map proposes and the memory decides:

1. the frozen backbone's features of each normal image (enlarged as the tiled model enlarges its
   tiles) are pooled over 3 x 3 neighbours, brought to the grid of the deepest layer and kept,
   one vector per grid cell (:meth:`FeatureMemory.fit`);
2. for an image, the ``candidates`` cells where its map is highest (away from the image's edge,
   whose features see the backbone's padding) are looked up, and its score is the largest
   distance from one of them to its nearest normal vector (:meth:`FeatureMemory.score`).

Only the candidates are looked up: the exact nearest neighbour of every cell of a megapixel
image (65,536 cells against half a million normal vectors) costs minutes on a CPU; a thousand
candidates cost a second or two. The search is exact (no sampling of the memory): a sampled memory lacks
some normal patterns, and its misses are exactly the false alarms this check removes.

Nothing here knows CKAAD: a frozen backbone, maps and images.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_open
from .errors import ArgumentError
from .validation import is_int

__all__ = ["FeatureMemory", "memory_features", "nearest_distances", "DEFAULT_CANDIDATES"]

#: Cells of the map looked up per image (of a 1024² image's 65,536 at 4 px a cell): on the #36
#: textures a defect's peak has a median of 2-140 pixels of its image above it; on the plate,
#: once normalised per position, 210-802.
DEFAULT_CANDIDATES = 500
#: Cells along the image's edge never proposed: their features see the backbone's zero padding,
#: and on the #36 sets the largest distances of normal images sat on the edge (gravel seed 0:
#: 23.4 on the edge where the interior's largest was 18.7). A defect within two cells (8 px at a
#: scale of 2 with Lite0's layer 2) of the edge is not checked.
DEFAULT_EDGE = 2
#: Memory rows compared at once: bounds the distance block at chunk x candidates floats.
_CHUNK = 32768


@torch.no_grad()
def memory_features(backbone, image: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """(C, gh, gw) float32 features of one normalised image (3, H, W): the image enlarged by
    ``scale``, each of the backbone's layers averaged over 3 x 3 neighbours and brought to the
    deepest layer's grid (area average), concatenated. A cell covers ``stride / scale`` image
    pixels, ``stride`` the deepest layer's."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ArgumentError("image", f"expected one normalised image (3, H, W), got {tuple(image.shape)}")
    x = image[None].float()
    if scale != 1.0:
        x = F.interpolate(x, scale_factor=float(scale), mode="bilinear", align_corners=False)
    feats = backbone(x)
    grid = feats[-1].shape[-2:]
    pooled = [F.adaptive_avg_pool2d(F.avg_pool2d(f.float(), 3, 1, 1, count_include_pad=False), grid) for f in feats]
    return torch.cat(pooled, 1)[0]


def nearest_distances(queries: torch.Tensor, memory: torch.Tensor, memory_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Euclidean distance of each row of ``queries`` (Q, C) to its nearest row of ``memory``
    (N, C), exactly, ``_CHUNK`` memory rows at a time. ``memory_sq``: the rows' squared norms
    (computed when not given)."""
    if memory_sq is None:
        memory_sq = (memory * memory).sum(1)
    q_sq = (queries * queries).sum(1, keepdim=True)
    best = torch.full((len(queries),), float("inf"), dtype=queries.dtype, device=queries.device)
    for i in range(0, len(memory), _CHUNK):
        block = memory[i:i + _CHUNK]
        d2 = memory_sq[None, i:i + _CHUNK] - 2.0 * (queries @ block.T)
        best = torch.minimum(best, d2.min(1).values)
    # |q|² + |m|² - 2 q.m loses |q|² exactly as well for every row, so it is added once, at the end.
    return (best + q_sq[:, 0]).clamp_min(0).sqrt()


@dataclass
class FeatureMemory:
    """Features of normal images (``vectors``, (N, C) float32) taken at ``scale`` by a backbone
    with ``layers``; see the module."""

    vectors: torch.Tensor
    scale: float
    backbone: str
    layers: tuple[int, ...]

    def __post_init__(self):
        self._sq = (self.vectors * self.vectors).sum(1)

    @classmethod
    def fit(cls, backbone, images: Iterable[torch.Tensor], scale: float = 1.0,
            max_bytes: int | None = None) -> "FeatureMemory":
        """Keep every cell's features of the normal ``images`` (normalised, (3, H, W) each).
        ``max_bytes`` (for a sequence of images, whose count is known after the first): where
        every cell would not fit, every k-th cell of each image, the smallest k that fits, with a
        warning (the memory then misses some normal patterns: expect more false alarms)."""
        rows, step = [], 1
        for img in images:
            cells = memory_features(backbone, img, scale).flatten(1).T
            if not rows and max_bytes is not None and hasattr(images, "__len__"):
                total = cells.numel() * cells.element_size() * len(images)
                step = -(-total // max_bytes)
                if step > 1:
                    warnings.warn(f"the feature memory of {len(images)} images would take {total / 2**30:.1f} GiB: "
                                  f"keeping every {step}th cell (at most {max_bytes / 2**30:.1f} GiB); normal "
                                  "patterns it misses can raise false alarms", UserWarning, stacklevel=3)
            rows.append(cells[::step].cpu())
        if not rows:
            raise ArgumentError("images", "a feature memory needs at least one normal image")
        return cls(torch.cat(rows).contiguous(), float(scale), backbone.name, tuple(backbone.layers))

    def features(self, backbone, image: torch.Tensor) -> torch.Tensor:
        """``image``'s (C, gh, gw) features as this memory keeps them (:func:`memory_features` at
        its scale), after checking that ``backbone`` is the memory's."""
        if (backbone.name, tuple(backbone.layers)) != (self.backbone, self.layers):
            raise ArgumentError("backbone", f"this memory holds {self.backbone} layers {self.layers}, "
                                f"not {backbone.name} layers {tuple(backbone.layers)}")
        return memory_features(backbone, image, self.scale)

    def candidates(self, feats: torch.Tensor, amap, candidates: int = DEFAULT_CANDIDATES,
                   edge: int = DEFAULT_EDGE) -> torch.Tensor:
        """Indices (into ``feats.flatten(1).T``) of the ``candidates`` grid cells where the map
        ``amap`` ((H, W), any resolution; a cell takes the map's maximum over it) is highest,
        leaving out the ``edge`` cells along each side (:data:`DEFAULT_EDGE`)."""
        if not is_int(candidates) or candidates < 1:
            raise ArgumentError("candidates", f"expected a positive integer, got {candidates!r}")
        if not is_int(edge) or edge < 0 or 2 * edge >= min(feats.shape[-2:]):
            raise ArgumentError("edge", f"expected an integer from 0 to less than half the grid "
                                        f"{tuple(feats.shape[-2:])}, got {edge!r}")
        amap = (amap.float() if isinstance(amap, torch.Tensor)
                else torch.as_tensor(np.asarray(amap, dtype=np.float32))).to(feats.device)
        if amap.dim() != 2:
            raise ArgumentError("amap", f"expected one (H, W) map, got shape {tuple(amap.shape)}")
        gh, gw = feats.shape[-2:]
        cell_map = F.adaptive_max_pool2d(amap[None, None], (gh, gw))[0, 0]
        inner = cell_map[edge:gh - edge, edge:gw - edge]
        top = inner.flatten().topk(min(int(candidates), inner.numel())).indices
        # Back from the inner block's indices to the whole grid's.
        return (top // inner.shape[1] + edge) * gw + top % inner.shape[1] + edge

    def distances(self, feats: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """Distance to the memory of each of ``cells`` (indices) of the features ``feats``."""
        return nearest_distances(feats.flatten(1).T[cells], self.vectors, self._sq)

    def score(self, backbone, image: torch.Tensor, amap, candidates: int = DEFAULT_CANDIDATES,
              edge: int = DEFAULT_EDGE) -> float:
        """The image's score: the largest distance to the memory among the ``candidates`` cells
        where its map ``amap`` is highest (the ``edge`` cells along each side left out)."""
        feats = self.features(backbone, image)
        return float(self.distances(feats, self.candidates(feats, amap, candidates, edge)).max())

    def save(self, path: str | os.PathLike) -> None:
        """Write the memory to ``path`` (.npz; written whole or not at all)."""
        with atomic_open(path, "wb") as fh:
            np.savez(fh, vectors=self.vectors.cpu().numpy(), scale=self.scale, backbone=self.backbone,
                     layers=np.asarray(self.layers))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "FeatureMemory":
        with np.load(path) as z:
            return cls(torch.from_numpy(z["vectors"]), float(z["scale"]), str(z["backbone"]),
                       tuple(int(v) for v in z["layers"]))
