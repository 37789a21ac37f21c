"""Bar charts drawn with Pillow: bar heights follow the values on the axis, every series gets its
colour, and bad inputs get one-line errors."""
from __future__ import annotations

import numpy as np
import pytest

from ckaad_fast.charts import PALETTE, bar_chart, side_by_side


def _column_height(picture: np.ndarray, colour) -> int:
    hits = (picture[:-62] == colour).all(axis=-1)  # the plot, above the group labels and the legend
    rows = np.flatnonzero(hits.any(axis=1))
    return int(rows[-1] - rows[0] + 1) if rows.size else 0


def test_bar_heights_follow_the_values():
    chart = bar_chart("t", ["a"], {"s0": [(25.0, None)], "s1": [(75.0, 5.0)]}, y_range=(0.0, 100.0))
    picture = np.asarray(chart)
    h0, h1 = _column_height(picture, PALETTE[0]), _column_height(picture, PALETTE[1])
    assert h0 > 0 and h1 == pytest.approx(3 * h0, rel=0.03)  # 75 against 25 on an axis from 0


def test_missing_bars_clipped_values_and_panels():
    chart = bar_chart("t", ["a", "b"], {"s": [None, (150.0, None)]}, y_range=(50.0, 100.0))
    assert _column_height(np.asarray(chart), PALETTE[0]) > 0  # clipped to the top, still drawn
    both = side_by_side([chart, chart], gap=8)
    assert both.size == (2 * chart.width + 8, chart.height)


def test_bad_charts_are_refused():
    with pytest.raises(ValueError, match="series 's' has 1 values for 2 groups"):
        bar_chart("t", ["a", "b"], {"s": [(1.0, None)]})
    with pytest.raises(ValueError, match="at least one group"):
        bar_chart("t", [], {})
    with pytest.raises(ValueError, match="y_range must rise"):
        bar_chart("t", ["a"], {"s": [(1.0, None)]}, y_range=(1.0, 1.0))
