"""From a raw score to a decision, numpy and Python only: the float32 decision threshold at a
sensitivity, and anomalib's normalised score. The inference head (:mod:`ckaad_fast.head`), the
calibration, the exported graphs and the deployment client that runs without PyTorch
(:mod:`ckaad_fast.deployment`) all decide with these (see :mod:`ckaad_fast.head` for why the
threshold is a float32 number)."""
from __future__ import annotations

import math

import numpy as np

__all__ = ["DEFAULT_SENSITIVITY", "check_sensitivity", "float32_at_least", "span", "normalized_score",
           "decision_threshold"]

#: The sensitivity at which the calibrated threshold decides (0: flag least, 1: flag everything).
DEFAULT_SENSITIVITY = 0.5


def check_sensitivity(sensitivity) -> float:
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, (int, float)) or not 0 <= sensitivity <= 1:
        raise ValueError(f"sensitivity must lie in [0, 1], got {sensitivity!r}")
    return float(sensitivity)


def float32_at_least(x: float) -> float:
    """The smallest float32 number >= ``x``, as a Python float (exact in float64)."""
    f = np.float32(x)
    if float(f) < x:
        f = np.nextafter(f, np.float32(np.inf))
    return float(f)


def span(lo: float, hi: float) -> float:
    return max(float(hi) - float(lo), 1e-12)


def normalized_score(scores, threshold: float, lo: float, hi: float):
    """anomalib's normalised score ``clip((s - t) / (hi - lo) + 0.5, 0, 1)``: for numpy arrays
    (computed in float64), torch tensors (in their dtype) and graph nodes with that arithmetic (the
    int8 graph's, :mod:`ckaad_fast.runtime.quantize`) alike. Monotone in ``s``; t -> 0.5."""
    if isinstance(scores, (np.ndarray, np.generic)) or not hasattr(scores, "clip"):
        scores = np.asarray(scores, dtype=np.float64)
    return ((scores - threshold) / span(lo, hi) + 0.5).clip(0.0, 1.0)


def decision_threshold(threshold: float, lo: float, hi: float, sensitivity: float = DEFAULT_SENSITIVITY) -> float:
    """The raw score at or above which an image is anomalous at ``sensitivity``: where the
    normalised score reaches ``1 - sensitivity``, i.e. ``t + (0.5 - sensitivity) (hi - lo)``,
    rounded up to a float32 number (:mod:`ckaad_fast.head` says why). Sensitivity 1 flags everything (-inf)."""
    sensitivity = check_sensitivity(sensitivity)
    cut = 1.0 - sensitivity
    if cut <= 0.0:
        return -math.inf
    return float32_at_least(float(threshold) + (cut - 0.5) * span(lo, hi))
