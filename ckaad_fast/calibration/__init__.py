"""From a raw score to a decision: thresholds calibrated on data that is not the test set.

:func:`calibrate` scores a calibration set with a trained detector and picks the image threshold:

- with anomalous images in the set, the one that maximises F1 (:func:`ckaad_fast.metrics.image_f1_acc`,
  sklearn's rule), and a pixel threshold the same way where the set has masks;
- with normal images only, the one at a chosen false-positive rate: the lowest threshold at which
  at most ``target_fpr`` of the normal scores are at or above it (the empirical quantile). A set
  too small for that rate (fewer than ``1 / target_fpr`` images) is refused.

Before trusting a set, it checks that the images it calls normal look normal: scores above Tukey's
far-out fence of the set's own normal scores (third quartile + 3 interquartile ranges), or, in a
set with improbably many high scores, above a robust fit's 95% line (see
:mod:`ckaad_fast.calibration_checks`) are counted as *suspected anomalies*, recorded with the threshold
the set would give without them, and, when they set the threshold (it lies above the fence and
differs from the one without them), named in a :class:`CalibrationSetWarning`. The threshold
is still picked on the whole set (the images may be normal after all); the warning says how far
it moved. Anomalies that score like normal images pass unseen (and move a threshold little).

It also records the minimum and maximum of the image scores and of the maps, for anomalib's
normalised score ``clip((s - t) / (max - min) + 0.5, 0, 1)`` (:func:`ckaad_fast.head.normalized_score`):
the threshold maps to 0.5 and the score stays monotone in the raw one. Decisions compare the raw
float32 score with a float32 threshold (:func:`ckaad_fast.head.decision_threshold`), the same
comparison in Python, numpy and an exported graph.

The calibration records the precision its scores were computed in (``precision``, float32 by
default: the same scores on every CPU and GPU up to float32 rounding), the kind of device and the
engine that ran the forward (:mod:`ckaad_fast.runtime`; ``auto`` by default: the fastest here). A
:class:`~ckaad_fast.scoring.Scorer` of the checkpoint scores in that precision, with that engine,
unless told otherwise, so that the images of the calibration set get exactly the decisions it
promised.
An image decision on regions instead of the top-k score (:mod:`.region_decision`: the largest
excess mass among the map's regions over a pixel threshold) is calibrated from normal maps the
same way, both its thresholds at once (:func:`calibrate_region_decision`).
:func:`write_calibration` stores the result in a checkpoint (a ``calibration`` entry; checkpoints
without one load as before), where :class:`ckaad_fast.scoring.Scorer` and ``ckaad-fast score``
find it.
"""
from __future__ import annotations

from ..lazy import exports

# Each public name, and the submodule that owns it: imported on first use, so that a deployment
# without torch reads a Calibration (.thresholds) without the calibration run (.run, torch).
__getattr__, __dir__, __all__ = exports(__name__, {
    "INT8_RANGE_IMAGES": "run", "calibrate": "run", "check_calibration_out": "run",
    "CALIBRATE_SHARE": "sets", "CALIBRATION_SPLIT": "sets", "check_calibration_split": "sets",
    "normal_folder_set": "sets", "split_for_calibration": "sets",
    "read_calibration": "store", "write_calibration": "store",
    "FENCE_IQRS": "thresholds", "TARGET_FPR": "thresholds", "Calibration": "thresholds",
    "CalibrationSetWarning": "thresholds", "calibration_from_scores": "thresholds", "check_set_size": "thresholds",
    "suspected_anomalies": "thresholds", "threshold_at_fpr": "thresholds",
    "RegionDecision": "region_decision", "calibrate_region_decision": "region_decision",
    "region_score": "region_decision",
})
