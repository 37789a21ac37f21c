"""Is a strategy better than the baseline, or is it training noise? Paired differences by seed.

Every strategy of an experiment runs on the same seeds, data draws and splits, so each of its runs
has a twin: the baseline's run (Recon by default) with the same seed on the same data (same
category; same anomaly classes, draw and r_l where the baseline's runs differ in them; Recon,
which uses no anomalies, runs once per seed and is every run's twin). The difference of a metric
between twins removes what the seed does to both (the data draw, the initial weights); what is
left varies from seed to seed, and its mean over seeds is the effect.

:func:`paired_difference` gives that mean with a 95% confidence interval from Student's t over the
seeds (each seed's difference is the mean of its twins' differences, as the tables average over
categories or classes within a seed first), and the two-sided p-value of the paired t-test (the
hypothesis: no difference). With one seed there is a difference and no interval.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDifference", "paired_difference", "BASELINE", "MATCH_FIELDS"]

#: The strategy the others are compared with (the paper's reconstruction-only baseline).
BASELINE = "recon"
#: What makes two runs twins (besides the seed), where the baseline's runs differ in it.
MATCH_FIELDS = ("category", "anomaly_classes", "draw", "ratio_labeled")


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of the per-seed differences (strategy minus baseline), its 95% interval
    ``(low, high)``, the paired t-test's ``p`` and the differences' sample standard deviation
    ``sd`` (None with one seed), over ``n`` seeds."""

    mean: float
    low: float | None
    high: float | None
    p: float | None
    n: int
    sd: float | None = None


def _key(run: dict, fields) -> tuple:
    return tuple(tuple(v) if isinstance(v := run.get(f), list) else v for f in fields)


def paired_difference(rows: list[dict], strategy: str, metric: str, baseline: str = BASELINE,
                      where=None) -> PairedDifference | None:
    """The paired difference of ``metric`` between ``strategy``'s runs and their baseline twins
    (see the module), over the runs ``where(row)`` keeps (all by default; the baseline's twins
    are looked up among all its runs). None when no run of ``strategy`` has a twin with the
    metric."""
    base = [r for r in rows if r["strategy"] == baseline and r.get(metric) is not None]
    fields = ["seed"] + [f for f in MATCH_FIELDS if len({_key(r, [f]) for r in base}) > 1]
    twins = defaultdict(list)
    for r in base:
        twins[_key(r, fields)].append(r[metric])
    per_seed = defaultdict(list)
    for r in rows:
        if r["strategy"] != strategy or r.get(metric) is None or (where is not None and not where(r)):
            continue
        found = twins.get(_key(r, fields))
        if found:
            per_seed[r["seed"]].append(r[metric] - float(np.mean(found)))
    if not per_seed:
        return None
    d = np.array([np.mean(v) for v in per_seed.values()], dtype=np.float64)
    n, mean = d.size, float(d.mean())
    if n < 2:
        return PairedDifference(mean, None, None, None, n)
    from scipy import stats

    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0.0:  # every seed moved by exactly the same amount
        return PairedDifference(mean, mean, mean, 0.0 if mean != 0 else 1.0, n, sd)
    half = float(stats.t.ppf(0.975, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return PairedDifference(mean, mean - half, mean + half, p, n, sd)
