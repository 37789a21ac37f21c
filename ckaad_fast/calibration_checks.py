"""Does a calibration set's "normal" part look normal? Two tests on its own image scores.

1. **Far out** (Tukey): a score above ``Q3 + FENCE_IQRS * IQR`` of the set is suspected. It
   catches defects that score like clear defects, but a fifth of the set in defects raises the
   quartiles with them: on the demo's model, 20 defects among 100 normal images moved a 1% threshold
   from 1.58 to 2.46 and the fence named 1 of them.
2. **Too many high scores** (a contamination test). The bulk is fitted robustly from the lower half
   of the log scores alone (median, and the spread read off the 5-40% quantiles), which defects
   among the normal images cannot reach. Under that fit, :data:`TEST_QUANTILE` (97.5%) of clean
   scores lie below a line; when the count above it is improbable for a clean set (binomial tail
   below :data:`TEST_ALPHA`, 1e-4), the set is contaminated and every score above the fit's
   :data:`NAME_QUANTILE` (95%) is suspected. Logs: detector scores are positive and right-skewed.

Measured (2026-12-07, the demo's model on fresh images of its generator: 400 normal, 240 defects
of four types; docs/CLI.md): sets of 100 normal images drawn from the 400 were called contaminated
in 0.05% of 2,000 draws (300 images: none of 500); 100 normal + 20 defects (5 of each type) were
detected in 87% of 500 draws, naming a median of 17 defects (at least 15 in 83% of draws) and of
1 normal image. Synthetic clean sets: log-normal (sigma 0.3, 300 images; 0.5, 100) 2.3% and 2.6%,
gamma(2) 0.1%, normal 0.5%.
"""
from __future__ import annotations

import numpy as np
# scipy.special, not scipy.stats: the same functions (bdtrc is binom.sf, ndtri norm.ppf) without
# the 0.7 s import of scipy.stats, which a deployment's start-up would pay for nothing.
from scipy.special import bdtrc, ndtri

__all__ = ["FENCE_IQRS", "TEST_QUANTILE", "TEST_ALPHA", "NAME_QUANTILE", "suspected_anomalies", "fence_rule"]

#: How many interquartile ranges above the third quartile a normal image's score may lie before
#: it is suspected of being an anomaly (Tukey's "far out"): 4.7 standard deviations for normally
#: distributed scores, about 1 in 150 images for a right-skewed (log-normal, sigma 0.5) set.
FENCE_IQRS = 3.0
#: The contamination test's line (a quantile of the fit), its significance, and the quantile above
#: which a contaminated set's scores are suspected (see the module).
TEST_QUANTILE = 0.975
TEST_ALPHA = 1e-4
NAME_QUANTILE = 0.95
#: The lower-half quantiles the spread is read from, and the smallest set the test runs on.
_FIT_QUANTILES = np.array([0.05, 0.1, 0.2, 0.3, 0.4])
_FIT_Z = ndtri(_FIT_QUANTILES)
_MIN_IMAGES = 20


def _contamination_cut(s: np.ndarray) -> float | None:
    """The score above which a contaminated set's images are suspected; None when the set passes
    the test (or is too small, or not all positive, to run it)."""
    if s.size < _MIN_IMAGES or not (s > 0).all():
        return None
    y = np.log(s)
    m = float(np.median(y))
    sigma = float(np.median((np.percentile(y, 100 * _FIT_QUANTILES) - m) / _FIT_Z))
    if not sigma > 0:
        return None
    above = int((y > m + ndtri(TEST_QUANTILE) * sigma).sum())
    if bdtrc(above - 1, s.size, 1 - TEST_QUANTILE) >= TEST_ALPHA:
        return None
    return float(np.exp(m + ndtri(NAME_QUANTILE) * sigma))


def suspected_anomalies(normal_scores) -> tuple[np.ndarray, float]:
    """Which of ``normal_scores`` are suspected of being anomalies by either test of the module,
    and the lowest score suspected from: ``(mask, fence)``."""
    s = np.asarray(normal_scores, dtype=np.float64).reshape(-1)
    q1, q3 = np.percentile(s, [25, 75])
    fence = float(q3 + FENCE_IQRS * (q3 - q1))
    cut = _contamination_cut(s)
    if cut is not None and cut < fence:
        fence = cut
    return s > fence, fence


def fence_rule(normal_scores) -> str:
    """Which test set the fence of :func:`suspected_anomalies`, in words (for its warning)."""
    s = np.asarray(normal_scores, dtype=np.float64).reshape(-1)
    q1, q3 = np.percentile(s, [25, 75])
    if suspected_anomalies(s)[1] < q3 + FENCE_IQRS * (q3 - q1):
        return (f"the {100 * NAME_QUANTILE:g}% line of the set's normal bulk: it holds improbably many high scores "
                "for a clean set")
    return f"the set's third quartile + {FENCE_IQRS:g} interquartile ranges"
