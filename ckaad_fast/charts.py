"""Grouped bar charts drawn with Pillow (no plotting library needed): the paper's Figure 2 and
per-defect-type bars, where a person would rather look than read.

:func:`bar_chart` draws one panel: groups along the x axis, one bar per series in each group, an
error bar of one standard deviation where given, the value above each bar, a legend.
:func:`side_by_side` puts panels next to each other.
"""
from __future__ import annotations

from typing import Sequence

from PIL import Image, ImageDraw

from . import drawing

__all__ = ["bar_chart", "side_by_side", "PALETTE"]

#: Series colours (colour-blind safe: Okabe and Ito's palette).
PALETTE = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233), (213, 94, 0),
           (240, 228, 66), (0, 0, 0))


def bar_chart(title: str, groups: Sequence[str], series: dict[str, Sequence[tuple[float, float | None] | None]],
              y_label: str = "", y_range: tuple[float, float] = (0.0, 100.0), size: tuple[int, int] = (560, 360),
              decimals: int = 1) -> Image.Image:
    """One panel. ``series``: name -> one ``(value, std or None)`` per group, or None for no bar;
    values outside ``y_range`` are drawn clipped to it (the label keeps the true value)."""
    if not groups or not series:
        raise ValueError("a bar chart needs at least one group and one series")
    for name, values in series.items():
        if len(values) != len(groups):
            raise ValueError(f"series {name!r} has {len(values)} values for {len(groups)} groups")
    lo, hi = y_range
    if not hi > lo:
        raise ValueError(f"y_range must rise, got {y_range}")
    w, h = size
    im = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(im)
    title_font, font, small = drawing.font(15), drawing.font(12), drawing.font(10)
    left, right, top, bottom = 52, 12, 34, 62
    draw.text(((w - drawing.text_width(draw, title, title_font)) // 2, 8), title, fill="black", font=title_font)

    def y_of(v: float) -> float:
        v = min(max(v, lo), hi)
        return top + (h - top - bottom) * (1 - (v - lo) / (hi - lo))

    for i in range(5):  # the axis with five ticks
        v = lo + (hi - lo) * i / 4
        y = y_of(v)
        draw.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        label = f"{v:g}"
        draw.text((left - 6 - drawing.text_width(draw, label, small), y - 6), label, fill="black", font=small)
    draw.line([(left, top), (left, h - bottom), (w - right, h - bottom)], fill="black")
    if y_label:
        draw.text((4, top - 20), y_label, fill="black", font=small)
    names = list(series)
    group_w = (w - left - right) / len(groups)
    bar_w = max(3.0, group_w * 0.8 / len(names))
    for g, group in enumerate(groups):
        x0 = left + g * group_w + group_w * 0.1
        for s, name in enumerate(names):
            item = series[name][g]
            if item is None:
                continue
            value, std = item
            xa, xb = x0 + s * bar_w, x0 + (s + 1) * bar_w - 2
            draw.rectangle([xa, y_of(value), xb, y_of(lo)], fill=PALETTE[s % len(PALETTE)])
            if std:
                xm = (xa + xb) / 2
                draw.line([(xm, y_of(value - std)), (xm, y_of(value + std))], fill="black", width=1)
                for v in (value - std, value + std):
                    draw.line([(xm - 3, y_of(v)), (xm + 3, y_of(v))], fill="black")
            text = f"{value:.{decimals}f}"
            tw = drawing.text_width(draw, text, small)
            draw.text(((xa + xb - tw) / 2, y_of(value + (std or 0)) - 13), text, fill="black", font=small)
        tw = drawing.text_width(draw, group, font)
        draw.text((left + g * group_w + (group_w - tw) / 2, h - bottom + 6), group, fill="black", font=font)
    x = left  # the legend, one row under the group labels
    for s, name in enumerate(names):
        draw.rectangle([x, h - 24, x + 12, h - 12], fill=PALETTE[s % len(PALETTE)])
        draw.text((x + 16, h - 25), name, fill="black", font=font)
        x += 16 + drawing.text_width(draw, name, font) + 18
    return im


def side_by_side(panels: Sequence[Image.Image], gap: int = 8) -> Image.Image:
    """Panels in one row on a white background."""
    w = sum(p.width for p in panels) + gap * (len(panels) - 1)
    out = Image.new("RGB", (w, max(p.height for p in panels)), "white")
    x = 0
    for p in panels:
        out.paste(p, (x, 0))
        x += p.width + gap
    return out
