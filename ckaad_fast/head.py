"""The inference head, written once: features and reconstructions -> anomaly maps -> image
scores -> normalised scores -> decisions.

Every path that scores an image goes through here: :class:`~ckaad_fast.model.Detector` (and so
``eval``, ``calibrate`` and training's evaluation), the :class:`~ckaad_fast.scoring.Scorer`, and
the exported graph (:mod:`ckaad_fast.export`), which asks for the ops' own decomposition into
standard operators (``standard_ops=True``) instead of the fused custom ops.

Decisions are made on the raw score against a *decision threshold* that is a float32 number
(rounded up from the calibration's float64 value, :func:`decision_threshold`). Scores are float32
on every path, so comparing a float32 score with that threshold gives the same answer in float32
(an exported graph), in float64 (Python) and in numpy, for every score including one that sits
exactly at the calibration quantile. The normalised score (anomalib's
``clip((s - t) / (max - min) + 0.5, 0, 1)``) is for people and dashboards; it reads 0.5 at the
threshold up to its own rounding, and it never decides.
"""
from __future__ import annotations


import torch
from torch import nn

from . import ops
from .decisions import (DEFAULT_SENSITIVITY, check_sensitivity, decision_threshold, float32_at_least, normalized_score,
                        span)
from .ops.scoring import upsample_blur_matrix
from .profiling import nvtx_range
from .tiling import tiled_maps

__all__ = ["InferenceHead", "DEFAULT_SENSITIVITY", "float32_at_least", "normalized_score", "decision_threshold",
           "decide", "check_sensitivity", "feature_sizes", "tiled_forward"]

#: The truncation of the Gaussian blur, in sigmas (scipy's default, the authors').
TRUNCATE = 4.0


def feature_sizes(image_size, strides) -> list[tuple[int, int]]:
    """The (h, w) of each backbone layer's feature map for an ``image_size`` input: ceil(size /
    stride), the convolutions' padding rule."""
    h, w = image_size
    return [(-(-h // s), -(-w // s)) for s in strides]


class InferenceHead(nn.Module):
    """Features and reconstructions -> (image scores (B,), anomaly maps (B, H, W)), float32.

    ``sigma``, ``border``: the blur of :func:`ckaad_fast.ops.anomaly_map`; ``topk``: the image
    score is the mean of the ``topk`` largest map values (None: the map's mean). Holds no weights.
    ``standard_ops=True`` computes the same maps with standard operators only (for exporters);
    with ``sizes=(out_size, feature sizes)`` its upsampling-and-blur matrices are buffers, which a
    tracer needs (see :func:`ckaad_fast.ops.anomaly_map_standard_ops`).
    """

    def __init__(self, sigma: float, border: str, topk: int | None, standard_ops: bool = False, sizes=None):
        super().__init__()
        self.sigma = float(sigma)
        self.border = border
        self.topk = topk
        self.standard_ops = standard_ops
        self._layers = 0
        if standard_ops and sizes is not None:
            (out_h, out_w), layers = sizes
            for i, (h, w) in enumerate(layers):
                rows = upsample_blur_matrix(h, out_h, self.sigma, TRUNCATE, border)
                cols = upsample_blur_matrix(w, out_w, self.sigma, TRUNCATE, border)
                self.register_buffer(f"rows{i}", torch.from_numpy(rows).float())
                self.register_buffer(f"cols{i}_t", torch.from_numpy(cols.T.copy()).float())
            self._layers = len(layers)

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}, border={self.border!r}, topk={self.topk}, standard_ops={self.standard_ops}"

    def anomaly_maps(self, features, reconstructions, out_size) -> torch.Tensor:
        # Under autocast a layer's output dtype depends on its last op; the maps take pairs of one
        # dtype (and accumulate in float32 whatever it is).
        reconstructions = [r if r.dtype == f.dtype else r.to(f.dtype) for f, r in zip(features, reconstructions)]
        if not self.standard_ops:
            return ops.anomaly_map(features, reconstructions, out_size=tuple(out_size), sigma=self.sigma,
                                   truncate=TRUNCATE, border=self.border)
        matrices = ([(getattr(self, f"rows{i}"), getattr(self, f"cols{i}_t")) for i in range(self._layers)]
                    if self._layers else None)
        return ops.anomaly_map_standard_ops(features, reconstructions, out_size=tuple(out_size), sigma=self.sigma,
                                            truncate=TRUNCATE, border=self.border, matrices=matrices)

    def image_scores(self, maps: torch.Tensor) -> torch.Tensor:
        return ops.image_score(maps, self.topk)

    def forward(self, features, reconstructions, out_size) -> tuple[torch.Tensor, torch.Tensor]:
        # Whatever precision the networks ran in, the head runs in float32.
        with torch.autocast(features[0].device.type, enabled=False), nvtx_range("head"):
            maps = self.anomaly_maps(features, reconstructions, out_size)
            return self.image_scores(maps), maps


def tiled_forward(forward, images: torch.Tensor, tiling, input_size, topk: int | None, batch: int = 16,
                  prepare=lambda t: t, image_score=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (B,), maps (B, H, W)) of full-size ``images`` (B, 3, H, W) for a tiled model
    (:mod:`ckaad_fast.tiling`): each image's tiles, ``batch`` at a time, through ``prepare``
    and ``forward`` (the model's forward on ``input_size`` batches); their maps stitched at the
    image's full resolution; the image score from the stitched map, by the one top-k rule
    (mean of the ``topk`` largest values of the full-resolution map; None: its mean), or by
    ``image_score(images, maps)`` where the model has a feature memory
    (:meth:`ckaad_fast.model.Detector.memory_scores`)."""
    maps = []
    for image in images:
        with nvtx_range("tiles"):
            maps.append(tiled_maps(image, tiling, input_size, forward, prepare=prepare, batch=batch))
    # One image (the Scorer's streams): a view, not a copy of a map that may be 80 MB.
    maps = maps[0][None] if len(maps) == 1 else torch.stack(maps)
    if image_score is not None:
        return image_score(images, maps), maps
    with nvtx_range("head"):
        return ops.image_score(maps, topk), maps


# ------------------------------------------------------------------------------------------------
# From scores to decisions (numbers a calibration holds: threshold t, scores' range lo..hi)
# ------------------------------------------------------------------------------------------------
def decide(scores: torch.Tensor, threshold: float, lo: float, hi: float, sensitivity: torch.Tensor) -> torch.Tensor:
    """The decisions of float32 ``scores`` at a run-time ``sensitivity`` tensor (one value, or one
    per image; clipped to [0, 1]), in tensor operations a graph can carry: ``score >=
    t + (0.5 - s)(hi - lo)`` evaluated in float64, which for a float32 score is exactly ``score >=
    decision_threshold(t, lo, hi, s)`` (that threshold is the float64 value rounded up to a float32
    number), and every image at sensitivity 1. Same arithmetic, same order as
    :func:`decision_threshold`."""
    cut = 1.0 - sensitivity.to(torch.float64).clamp(0.0, 1.0)
    value = float(threshold) + (cut - 0.5) * span(lo, hi)
    return (scores.to(torch.float64) >= value) | (cut <= 0.0)
