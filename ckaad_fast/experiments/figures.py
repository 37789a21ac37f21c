"""The paper's Figure 2, drawn: image AUC and F1 of each strategy against k, the number of anomaly
classes the labelled anomalies come from (class-labelled data), as grouped bars with one standard
deviation over seeds (:mod:`ckaad_fast.charts`).

``ckaad-fast experiment table1 --num-anomaly-classes K`` (K > 1) draws its own experiment's bars
into ``OUT/figure2.png``, one group per r_l at that k; :func:`figure2` takes several experiments
(one per k, as the paper's figure) and puts each k's groups side by side. Recon uses no labelled
anomalies, so its one run per seed stands in every group, as the baseline.
"""
from __future__ import annotations

from PIL import Image

from ..charts import bar_chart, side_by_side
from .tables import STRATEGY_NAMES, aggregate

__all__ = ["figure2", "FIGURE2_METRICS"]

#: The figure's two panels: metric key -> axis title (values in %).
FIGURE2_METRICS = {"image_auroc": "AUC (%)", "image_f1": "F1 (%)"}


def _groups(exp, rows: list[dict]):
    """(label, ratio) of every bar group of one experiment, and its per-(ratio, strategy) stats."""
    stats = aggregate(rows, lambda r: (r["ratio_labeled"], r["strategy"]), FIGURE2_METRICS)
    ratios = sorted({ratio for ratio, s in stats if s != "recon"})
    several = len(ratios) > 1
    labels = [(f"k={exp.num_classes}" + (f", r_l {100 * ratio:g}%" if several else ""), ratio) for ratio in ratios]
    return labels, stats


def figure2(experiments) -> Image.Image | None:
    """Figure 2 of ``experiments``: ``(Experiment, rows)`` pairs of class-labelled data, in the
    order of their k; None when none has a finished run of a strategy that uses labelled
    anomalies."""
    groups, strategies, cells = [], [], {}
    for exp, rows in experiments:
        if not exp.class_labelled:
            continue
        labels, stats = _groups(exp, rows)
        recon = next((st for (ratio, s), st in stats.items() if s == "recon"), None)
        for label, ratio in labels:
            groups.append(label)
            for s in exp.strategies:
                st = recon if s == "recon" else stats.get((ratio, s))
                if st:
                    if s not in strategies:
                        strategies.append(s)
                    cells[(label, s)] = st
    if not groups:
        return None
    panels = []
    for metric, axis in FIGURE2_METRICS.items():
        series = {}
        for s in strategies:
            values = []
            for g in groups:
                st = cells.get((g, s), {}).get(metric)
                values.append(None if st is None else (100 * st[0], None if st[1] is None else 100 * st[1]))
            series[STRATEGY_NAMES.get(s, s)] = values
        shown = [v for vals in series.values() for v in vals if v is not None]
        low = min((v - (sd or 0) for v, sd in shown), default=0.0)
        floor = max(0.0, 10 * int(low // 10) - 10)  # a y axis that shows the differences, starting at a round number
        panels.append(bar_chart(f"{axis.split(' ')[0]}: mean ± std over seeds", groups, series, axis, (floor, 100.0)))
    return side_by_side(panels)
