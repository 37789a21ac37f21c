"""Text on pictures drawn with Pillow: the one place a font is loaded and a text measured, for the
reports' picture grids and the bar charts."""
from __future__ import annotations

from PIL import ImageDraw, ImageFont

__all__ = ["font", "text_width"]


def font(size: int):
    """Pillow's default font at ``size`` pixels (Pillow >= 10.1); a fixed bitmap font before."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def text_width(draw: ImageDraw.ImageDraw, text: str, face) -> int:
    """How many pixels wide ``text`` is in ``face``."""
    x0, _, x1, _ = draw.textbbox((0, 0), text, font=face)
    return x1 - x0
