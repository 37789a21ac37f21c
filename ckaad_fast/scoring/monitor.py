"""Does the calibration still hold? A production line's calibration promises how many normal
images it flags; a lighting change or a new batch of material breaks that promise silently.

Every calibrated ``score`` run compares the share of images it flagged with the calibration's
promise for normal images (:meth:`~ckaad_fast.calibration.Calibration.normal_flag_rate`) by a
one-sided binomial test: with ``n`` images scored and ``k`` flagged, the chance of ``k`` or more
at the promised rate. Below :data:`ALPHA` it warns (:class:`PromiseWarning`): either more parts
are defective than usual, or the images no longer look like the calibration's, and a person
should look. A run of :data:`WINDOW` images or more is also tested as it goes, on the last
``WINDOW`` images every half window (each test at ``ALPHA`` divided by the number of tests the
run can make), so that a change in the middle of a long run is seen when it happens.

``run.json`` records the whole run's test under ``monitor``, the first window that failed, and
how far the run's scores have moved from the calibration's normal ones: the median score against
the calibration set's normal median, in units of its interquartile range.
"""
from __future__ import annotations

import warnings
from collections import deque

import numpy as np
from scipy.special import bdtrc  # binom.sf, without importing scipy.stats (0.7 s of start-up)

__all__ = ["ALPHA", "WINDOW", "PromiseWarning", "promise_test", "score_shift", "PromiseMonitor", "monitor_for",
           "decided"]

#: The significance at which a run's flagged share breaks the promise: one false alarm in a
#: thousand runs of normal images.
ALPHA = 1e-3
#: The rolling window of a long run, in images.
WINDOW = 500


class PromiseWarning(UserWarning):
    """A run flagged significantly more images than its calibration promises for normal ones."""


def promise_test(n: int, k: int, rate: float) -> dict:
    """The one-sided binomial test of ``k`` flagged among ``n`` at the promised ``rate``."""
    p = float(bdtrc(k - 1, n, rate)) if k > 0 else 1.0
    return {"images": int(n), "flagged": int(k), "promised_rate": float(rate), "expected": float(n * rate),
            "p_value": p}


def score_shift(scores, calibration) -> dict | None:
    """The run's median score against the calibration set's normal median, in units of its
    interquartile range (None without recorded normal scores, or without scores)."""
    normal = getattr(calibration, "normal_scores", None)
    scores = np.asarray(scores, dtype=np.float64)
    if not normal or scores.size == 0:
        return None
    q1, median, q3 = np.quantile(np.asarray(normal, dtype=np.float64), [0.25, 0.5, 0.75])
    run = float(np.median(scores))
    iqr = float(q3 - q1)
    return {"median": run, "calibration_normal_median": float(median), "calibration_normal_iqr": iqr,
            "shift_in_iqr": (run - float(median)) / iqr if iqr > 0 else None}


class PromiseMonitor:
    """The promise of ``calibration`` at ``sensitivity`` over a run of ``total`` images: feed it
    each image's decision in input order (:meth:`add`); :meth:`finish` tests the whole run."""

    def __init__(self, calibration, sensitivity: float, total: int):
        self.calibration = calibration
        self.rate = calibration.normal_flag_rate(sensitivity)
        self.window: deque[bool] = deque(maxlen=WINDOW)
        self.seen = 0
        checks = max(1, 2 * total // WINDOW - 1)  # a test every half window once one is full
        self.alpha_window = ALPHA / checks
        self.first_window: dict | None = None

    def add(self, flagged: bool) -> None:
        """One image's decision; a full window is tested every half window."""
        if self.rate is None:
            return
        self.window.append(bool(flagged))
        self.seen += 1
        if self.first_window is None and self.seen >= WINDOW and (self.seen - WINDOW) % (WINDOW // 2) == 0:
            test = promise_test(len(self.window), sum(self.window), self.rate)
            if test["p_value"] < self.alpha_window:
                self.first_window = {**test, "ends_at_image": self.seen, "alpha": self.alpha_window}
                warnings.warn(f"images {self.seen - WINDOW + 1}-{self.seen} of this run: {test['flagged']} of "
                              f"{WINDOW} flagged, where the calibration promises about {test['expected']:.1f} for "
                              f"normal images (p = {test['p_value']:.2g}): {_advice()}", PromiseWarning, stacklevel=2)

    def finish(self, flags, scores) -> dict:
        """The record of the whole run (``flags``: every decided image's decision, ``scores``:
        their scores), with a warning when it breaks the promise."""
        record = {"alpha": ALPHA, "window": WINDOW, "first_failing_window": self.first_window,
                  "score_shift": score_shift(scores, self.calibration)}
        if self.rate is None:
            return {**record, "test": None,
                    "note": "the calibration records no normal scores to compare with: calibrate again"}
        flags = [bool(f) for f in flags]
        test = promise_test(len(flags), sum(flags), self.rate)
        test["significant"] = bool(len(flags) and test["p_value"] < ALPHA)
        if test["significant"]:
            share = test["flagged"] / test["images"]
            warnings.warn(f"{test['flagged']} of {test['images']} images flagged ({100 * share:.3g}%), where the "
                          f"calibration promises {100 * self.rate:.3g}% of normal images (p = "
                          f"{test['p_value']:.2g}): {_advice()}", PromiseWarning, stacklevel=2)
        return {**record, "test": test}


def _advice() -> str:
    return ("more parts are defective than usual, or the images no longer look like the calibration's (lighting, "
            "camera, material); check a few flagged images, and calibrate again if they are normal")


def monitor_for(verdict, total: int) -> PromiseMonitor | None:
    """The monitor of a run decided by ``verdict`` over ``total`` images: one for a calibrated
    decision, None for a raw threshold (it promises nothing) or no decision."""
    if verdict.threshold is not None or verdict.calibration is None:
        return None
    return PromiseMonitor(verdict.calibration, verdict.sensitivity, total)


def decided(rows, verdict) -> tuple[list[bool], list[float]]:
    """Each scored row's decision and score, in the rows' order (the float32 score its text holds,
    as the row's own decision reads it: :func:`.results.finish_row`)."""
    scores = [float(np.float32(r["score"])) for r in rows if r.get("score", "") != "" and not r.get("error")]
    scores = [v for v in scores if np.isfinite(v)]
    return [verdict.anomalous(v) for v in scores], scores
