"""Thresholds from a calibration set's scores: :class:`Calibration` (what a checkpoint stores),
the threshold at a false-positive rate, the one of best F1, and the checks on the set's size and
its normal images (the rules are the package's, :mod:`ckaad_fast.calibration`)."""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass

import numpy as np

from ..calibration_checks import FENCE_IQRS, fence_rule, suspected_anomalies
from ..errors import ArgumentError
from ..decisions import DEFAULT_SENSITIVITY, decision_threshold, float32_at_least, normalized_score
from ..metrics import image_f1_acc
from ..records import PlainConfig
from ..precision import canonical_precision
from ..runtime.plan import ENGINES

__all__ = ["Calibration", "CalibrationSetWarning", "TARGET_FPR", "threshold_at_fpr", "calibration_from_scores",
           "normal_images_needed", "check_set_size", "suspected_anomalies", "FENCE_IQRS", "NORMAL_SCORES_KEPT",
           "kept_normal_scores", "PIXEL_FPR", "pixel_threshold_at_fpr"]

#: The false-positive rate a set of normal images is calibrated at, unless told otherwise: 1% of
#: normal images flagged (the one owner of this default: calibrate, train --calibrate, the
#: pipeline and the command line read it here).
TARGET_FPR = 0.01
#: The pixel false-positive rate a pixel threshold is picked at where the calibration set has no
#: masks to pick it by F1: one normal pixel in ten thousand (AUPIMO's upper bound).
PIXEL_FPR = 1e-4

METHODS = ("f1", "fpr")


class CalibrationSetWarning(UserWarning):
    """A calibration set's images labelled normal include some that score like anomalies."""


@dataclass
class Calibration(PlainConfig):
    """Thresholds and normalisation statistics picked on a calibration set (see the module)."""

    _kind = "calibration"

    image_threshold: float
    score_min: float
    score_max: float
    method: str  # "f1" (anomalies present) or "fpr" (normal images only)
    target_fpr: float | None = None
    pixel_threshold: float | None = None
    map_min: float | None = None
    map_max: float | None = None
    num_normal: int = 0
    num_anomalous: int = 0
    #: The precision the calibration set was scored in (None: a calibration older than this
    #: record, which was float32).
    precision: str | None = None
    #: The kind of device it was scored on ("cpu" or "cuda"; None: not recorded): on a GPU,
    #: float32 convolutions run in TF32 by PyTorch's default, which moves scores by about 1e-4.
    device: str | None = None
    #: How many images labelled normal scored above the set's far-out fence (see the module), and
    #: the image threshold the set gives without them (None: none suspected, or too few left).
    suspected_anomalies: int = 0
    threshold_without_suspected: float | None = None
    #: True when the set was the model's own training images, by explicit override: their scores
    #: are lower than fresh images', so the threshold flags more than its target on new data.
    on_training_images: bool = False
    #: The engine that scored the set (:mod:`ckaad_fast.runtime.engines`; None: a calibration
    #: older than this record, which was torch's). A Scorer follows it, as it follows precision.
    engine: str | None = None
    #: For precision "int8": what was quantized and how, and what it cost on the check set
    #: (:func:`ckaad_fast.runtime.quantize.quantize_graph`'s report). The quantized graph itself
    #: travels as the attribute ``int8_graph`` and is stored beside the calibration.
    quantization: dict | None = None
    #: The calibration set's normal scores, sorted (at most NORMAL_SCORES_KEPT, evenly spaced in
    #: rank): what a run's share of flagged images and its score distribution are compared with
    #: (:mod:`ckaad_fast.scoring.monitor`; None: a calibration older than this record).
    normal_scores: list | None = None
    #: How the pixel threshold was picked: "f1" (on the set's masks) or "fpr" (at ``pixel_fpr`` of
    #: the normal images' pixels); None: no pixel threshold, or a calibration older than this record.
    pixel_method: str | None = None
    pixel_fpr: float | None = None

    def __post_init__(self):
        if self.device not in (None, "cpu", "cuda"):
            raise ValueError(f"calibration device must be 'cpu', 'cuda' or None, got {self.device!r}")
        if self.precision is not None:
            self.precision = canonical_precision(self.precision, "precision", int8=True)
            if self.precision == "auto":
                raise ValueError("calibration precision must be a resolved one (float32, bfloat16, float16), not auto")
        if self.engine not in (None, *ENGINES[1:]):
            raise ValueError(f"calibration engine must be one of {ENGINES[1:]} or None, got {self.engine!r}")
        if self.method not in METHODS:
            raise ValueError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        for name in ("image_threshold", "score_min", "score_max"):
            if not math.isfinite(float(getattr(self, name))):
                raise ValueError(f"calibration {name} must be finite, got {getattr(self, name)!r}")
        if not float(self.score_max) > float(self.score_min):
            # Every normalised score would saturate at 0 or 1: the range carries no information.
            raise ValueError(f"calibration score_max ({self.score_max!r}) must exceed score_min ({self.score_min!r})")

    def normalize(self, scores):
        """anomalib's normalised score: ``clip((s - t) / (max - min) + 0.5, 0, 1)``; t -> 0.5."""
        out = normalized_score(scores, self.image_threshold, self.score_min, self.score_max)
        return float(out) if out.ndim == 0 else out

    def decision_threshold(self, sensitivity: float = DEFAULT_SENSITIVITY) -> float:
        """The float32 raw score at or above which an image is anomalous at ``sensitivity``."""
        return decision_threshold(self.image_threshold, self.score_min, self.score_max, sensitivity)

    def normalize_map(self, amap):
        """A map on the same scale: ``clip((m - t) / (map_max - map_min) + 0.5, 0, 1)`` with the pixel
        threshold (the image threshold where the calibration set had no masks); t -> 0.5."""
        t = self.pixel_threshold if self.pixel_threshold is not None else self.image_threshold
        lo = self.map_min if self.map_min is not None else self.score_min
        hi = self.map_max if self.map_max is not None else self.score_max
        return normalized_score(np.asarray(amap, dtype=np.float32), t, lo, hi).astype(np.float32)

    def is_anomalous(self, score: float, sensitivity: float = DEFAULT_SENSITIVITY) -> bool:
        """The decision at ``sensitivity`` (0-1; 0.5 is the calibrated threshold, higher flags
        more): the score at or above :meth:`decision_threshold` (where the normalised score
        reaches ``1 - sensitivity``)."""
        return bool(score >= self.decision_threshold(sensitivity))

    def normal_flag_rate(self, sensitivity: float = DEFAULT_SENSITIVITY) -> float | None:
        """The share of normal images this calibration promises to flag at ``sensitivity``: the
        share of the calibration set's own normal images at or above the decision threshold,
        counted as ``(k + 1) / (n + 2)`` so that a set that flagged none still allows a little, and
        at least the target false-positive rate at a normal-only set's calibrated threshold (None:
        no normal scores recorded, and no target to go by)."""
        t = self.decision_threshold(sensitivity)
        target = self.target_fpr if self.method == "fpr" and t == self.decision_threshold() else None
        if not self.normal_scores:
            return target
        kept = np.asarray(self.normal_scores, dtype=np.float64)
        n = max(int(self.num_normal), kept.size)
        k = float(np.mean(kept >= t)) * n
        rate = (k + 1.0) / (n + 2.0)
        return max(rate, target) if target is not None else rate

    def describe(self) -> str:
        how = (f"best F1 on {self.num_normal} normal and {self.num_anomalous} anomalous images"
               if self.method == "f1" else
               f"false-positive rate {100 * self.target_fpr:g}% on {self.num_normal} normal images")
        pixel = f", pixel threshold {self.pixel_threshold:.6g}" if self.pixel_threshold is not None else ""
        where = (f" on {self.device}" if self.device else "") + (f" by {self.engine}" if self.engine else "")
        text = (f"image threshold {self.image_threshold:.6g} ({how}){pixel}; scores on that set "
                f"{self.score_min:.6g} .. {self.score_max:.6g}, computed in {self.precision or 'float32'}{where}")
        q = self.quantization
        if q:
            cost = (f"AUROC {q['auroc_float32']:.4f} -> {q['auroc_int8']:.4f} on the {q['measured_on']}, "
                    if q.get("auroc_drop") is not None else "")
            text += (f"; int8 ({q['method']}, {q['scope']} quantized): {cost}scores moved by up to "
                     f"{100 * q['relative_score_change']['max']:.2g}%")
        if self.suspected_anomalies:
            moved = (f" (without them: {self.threshold_without_suspected:.6g})"
                     if self.threshold_without_suspected is not None else "")
            text += f"; {self.suspected_anomalies} images labelled normal scored like anomalies{moved}"
        if self.on_training_images:
            text += ("; picked on the model's training images (explicit override): expect more false positives "
                     "than the target on new images")
        return text


#: The most normal scores a calibration keeps (evenly spaced in rank, the extremes included).
NORMAL_SCORES_KEPT = 512


def kept_normal_scores(normal_scores) -> list[float]:
    """The sorted normal scores a calibration records: all of them, or NORMAL_SCORES_KEPT evenly
    spaced in rank (the lowest and the highest among them), as float32 values."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if s.size > NORMAL_SCORES_KEPT:
        s = s[np.linspace(0, s.size - 1, NORMAL_SCORES_KEPT).round().astype(int)]
    return [float(np.float32(v)) for v in s]


def pixel_threshold_at_fpr(normal_top, normal_pixels: int, pixel_fpr: float) -> float:
    """The lowest float32 threshold at which at most ``pixel_fpr`` of ``normal_pixels`` normal map
    pixels are at or above it, from their largest values ``normal_top`` (descending, at least
    ``pixel_fpr * normal_pixels + 1`` of them): :func:`threshold_at_fpr`'s rule on pixels."""
    if not (isinstance(pixel_fpr, (int, float)) and 0 < pixel_fpr < 1):
        raise ArgumentError("pixel_fpr", f"must lie in (0, 1), got {pixel_fpr!r}")
    top = np.asarray(normal_top, dtype=np.float64)
    k = int(math.floor(pixel_fpr * normal_pixels + 1e-9))  # how many normal pixels may be above
    if k >= top.size:
        raise ValueError(f"{top.size} largest normal map values cannot place a threshold at {pixel_fpr:g} of "
                         f"{normal_pixels} pixels")
    return float32_at_least(float(np.nextafter(top[k], np.inf)))


def threshold_at_fpr(normal_scores, target_fpr: float) -> float:
    """The lowest float32 threshold at which at most ``target_fpr`` of ``normal_scores`` are >= it.

    Scores are float32 on every path, so the threshold is a float32 number too (the next one
    above the (k+1)-th largest score): exact in every precision it is compared in."""
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    n = s.size
    k = int(math.floor(target_fpr * n + 1e-9))  # how many normal images may be flagged
    # Everything strictly above the (k+1)-th largest score: ties never push the rate above target.
    return float32_at_least(float(np.nextafter(s[n - 1 - k], np.inf)))


def calibration_from_scores(labels, scores, target_fpr: float = TARGET_FPR, masks=None, maps=None,
                            precision: str | None = None, device: str | None = None,
                            paths=None, on_training_images: bool = False, engine: str | None = None,
                            map_range=None, normal_top=None, normal_pixels: int = 0,
                            pixel_fpr: float = PIXEL_FPR) -> Calibration:
    """A :class:`Calibration` from a calibration set's labels and image scores (and, optionally,
    its masks and maps), computed in ``precision`` (None: float32, as the record of calibrations
    older than it reads). The pixel threshold is the one of best F1 on the masks where the set
    has anomalous pixels, else the one at ``pixel_fpr`` of the normal maps' ``normal_pixels``
    pixels, whose largest values are ``normal_top`` (descending;
    :func:`ckaad_fast.evaluation.predict_dataset`'s). Images labelled normal that score like
    anomalies are counted, recorded and named (``paths``) in a :class:`CalibrationSetWarning`
    (see the module). Errors are :class:`~ckaad_fast.errors.ArgumentError` naming the argument."""
    cal = _calibration(labels, scores, target_fpr, masks, maps, precision, device, map_range)
    if cal.pixel_threshold is None and normal_top is not None and normal_pixels:
        cal.pixel_threshold = pixel_threshold_at_fpr(normal_top, normal_pixels, pixel_fpr)
        cal.pixel_method, cal.pixel_fpr = "fpr", float(pixel_fpr)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    cal.on_training_images = bool(on_training_images)
    cal.engine = engine
    normal = np.flatnonzero(labels == 0)
    suspect, fence = suspected_anomalies(scores[normal])
    if suspect.any():
        cal.suspected_anomalies = int(suspect.sum())
        keep = np.ones(scores.size, dtype=bool)
        keep[normal[suspect]] = False
        try:
            cal.threshold_without_suspected = _calibration(
                labels[keep], scores[keep], target_fpr, None if masks is None else np.asarray(masks)[keep],
                None if maps is None else np.asarray(maps)[keep], precision, device,
                None if map_range is None else np.asarray(map_range)[keep]).image_threshold
        except ArgumentError:  # too few left for the rate, or all alike: say so without a number
            cal.threshold_without_suspected = None
    if suspect.any() and cal.image_threshold > fence and cal.threshold_without_suspected != cal.image_threshold:
        # Only when the suspects set the threshold: above the fence (below it they are images the
        # rate allows to flag), and not the one without them (F1 may pick it either way).
        named = [os.fspath(paths[i]) for i in normal[suspect][:3]] if paths is not None else []
        moved = (f"; without them it would be {cal.threshold_without_suspected:.6g}"
                 if cal.threshold_without_suspected is not None else "")
        warnings.warn(
            f"{cal.suspected_anomalies} of {normal.size} calibration images labelled normal score above "
            f"{fence:.6g} ({fence_rule(scores[normal])}), as defects do"
            + (f", e.g. {', '.join(named)}" if named else "")
            + f". The threshold {cal.image_threshold:.6g} was picked with them{moved}. If they are defects, take "
              "them out of the normal set and calibrate again; if they are normal, the threshold stands.",
            CalibrationSetWarning, stacklevel=2)
    return cal


def _calibration(labels, scores, target_fpr, masks, maps, precision, device, map_range=None) -> Calibration:
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size == 0:
        raise ArgumentError("data", "the calibration set is empty")
    if labels.size != scores.size:
        raise ArgumentError("data", f"{labels.size} labels for {scores.size} scores")
    if not np.isfinite(scores).all():
        raise ArgumentError("data", f"{int((~np.isfinite(scores)).sum())} calibration images have no finite score")
    if not (isinstance(target_fpr, (int, float)) and 0 < target_fpr < 1):
        raise ArgumentError("target_fpr", f"must lie in (0, 1), got {target_fpr!r}")
    n_normal, n_anom = int((labels == 0).sum()), int((labels == 1).sum())
    if n_normal == 0:
        raise ArgumentError("data", "the calibration set holds no normal image")
    if scores.max() == scores.min():
        raise ArgumentError("data", f"every one of the {scores.size} calibration images got the same score "
                                    f"({scores[0]:.6g}): the model cannot tell them apart, so no threshold picked on "
                                    "them means anything (is it trained? are the images all alike?)")
    cal = dict(score_min=float(scores.min()), score_max=float(scores.max()), num_normal=n_normal,
               num_anomalous=n_anom, precision=precision, device=device,
               normal_scores=kept_normal_scores(scores[labels == 0]))
    if maps is not None:
        maps = np.asarray(maps)
        cal.update(map_min=float(maps.min()), map_max=float(maps.max()))
    elif map_range is not None:  # each map's (min, max): what a set without masks keeps
        cal.update(map_min=float(np.min(map_range)), map_max=float(np.max(map_range)))
    if n_anom:
        cal.update(method="f1", image_threshold=image_f1_acc(labels, scores)[2])
        if masks is not None and maps is not None and np.asarray(masks).any():
            cal["pixel_threshold"] = image_f1_acc(np.asarray(masks).reshape(-1) > 0, maps.reshape(-1))[2]
            cal["pixel_method"] = "f1"
    else:
        check_set_size(n_normal, 0, target_fpr)
        cal.update(method="fpr", target_fpr=float(target_fpr),
                   image_threshold=threshold_at_fpr(scores[labels == 0], target_fpr))
    return Calibration(**cal)


def normal_images_needed(target_fpr: float) -> int:
    """How many normal images a normal-only set needs for ``target_fpr``: 1 / rate."""
    return int(math.ceil(1.0 / target_fpr - 1e-9))


def check_set_size(n_normal: int, n_anomalous: int, target_fpr: float) -> None:
    """Refuse, before anything is scored, a normal-only set too small for ``target_fpr``."""
    need = normal_images_needed(target_fpr)
    if n_anomalous == 0 and n_normal < need:
        raise ArgumentError("data", f"a {100 * target_fpr:g}% false-positive rate needs at least {need} normal "
                                    f"images to calibrate on, got {n_normal}")
