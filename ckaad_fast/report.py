"""Pictures and reports a person can look at: heat-map overlays, a picture grid and an HTML report.

Drawn with PIL and numpy only (no matplotlib). The colour map is Google's *Turbo* (a perceptually
smoother rainbow: dark blue for low values, green-yellow in the middle, dark red for high ones),
computed from its published polynomial approximation. Every function takes an explicit colour
range ``(lo, hi)``, so that a set of overlays shares one scale and their colours are comparable.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .atomic import atomic_open, atomic_write_text
from . import drawing
from .metrics import METRIC_TABLE

__all__ = [
    "turbo",
    "colorize",
    "overlay",
    "mask_overlay",
    "colour_range",
    "colour_bar",
    "picture_grid",
    "save_png",
    "write_html_report",
]

# Turbo, polynomial fit by its author (A. Mikhailov, Google AI blog 2019), max error < 1%.
_TURBO_R = (0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943)
_TURBO_G = (0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604)
_TURBO_B = (0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973)


def _poly(c, x):
    out = np.full_like(x, c[-1])
    for a in reversed(c[:-1]):
        out = out * x + a
    return out


def _turbo_lut() -> np.ndarray:
    x = np.linspace(0.0, 1.0, 256)
    rgb = np.stack([_poly(_TURBO_R, x), _poly(_TURBO_G, x), _poly(_TURBO_B, x)], axis=1)
    return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


_LUT = _turbo_lut()


def turbo(x: np.ndarray) -> np.ndarray:
    """Turbo colours (..., 3) uint8 of values ``x`` in [0, 1] (clipped)."""
    idx = np.clip(np.asarray(x, dtype=np.float32) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _LUT[idx]


def colorize(amap: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """(H, W) map → (H, W, 3) uint8 Turbo colours, ``lo`` dark blue and ``hi`` dark red (clipped)."""
    amap = np.asarray(amap, dtype=np.float32)
    if amap.ndim != 2:
        raise ValueError(f"amap must be (H, W), got shape {amap.shape}")
    span = float(hi) - float(lo)
    if not np.isfinite(span) or span <= 0:
        span = 1e-12
    x = (amap - float(lo)) / span
    return turbo(np.nan_to_num(x, nan=0.0))


def _as_rgb_u8(image: np.ndarray, size_hw: tuple[int, int] | None = None) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4):
        raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got shape {img.shape}")
    img = img[:, :, :3]
    if img.dtype != np.uint8:
        img = (np.clip(img.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    if size_hw is not None and img.shape[:2] != tuple(size_hw):
        img = np.asarray(Image.fromarray(img).resize((size_hw[1], size_hw[0]), Image.BILINEAR))
    return img


def overlay(image: np.ndarray, amap: np.ndarray, lo: float, hi: float, alpha: float = 0.5) -> np.ndarray:
    """The image blended with the Turbo colours of its anomaly map: ``(1 - alpha) image + alpha
    colour``, (H, W, 3) uint8 at the map's size (the image is resized to it when it differs).
    ``image``: (H, W[, 3]) uint8, or floats in [0, 1]."""
    amap = np.asarray(amap, dtype=np.float32)
    img = _as_rgb_u8(image, amap.shape)
    col = colorize(amap, lo, hi).astype(np.float32)
    out = (1.0 - alpha) * img.astype(np.float32) + alpha * col
    return (out + 0.5).astype(np.uint8)


def mask_overlay(image: np.ndarray, mask: np.ndarray | None, alpha: float = 0.55) -> np.ndarray:
    """Ground truth for a person: the image dimmed, the defect's pixels filled red and outlined."""
    img = _as_rgb_u8(image)
    dim = img.astype(np.float32) * 0.45
    if mask is None or not np.any(mask):
        return (dim + 0.5).astype(np.uint8)
    m = np.asarray(mask).astype(bool)
    if m.shape != img.shape[:2]:
        m = np.asarray(Image.fromarray(m.astype(np.uint8) * 255).resize((img.shape[1], img.shape[0]), Image.NEAREST)) > 127
    red = np.array([255.0, 40.0, 40.0], dtype=np.float32)
    dim[m] = (1 - alpha) * img[m].astype(np.float32) + alpha * red
    # Outline: mask pixels with a non-mask 4-neighbour.
    pad = np.pad(m, 1)
    inner = pad[:-2, 1:-1] & pad[2:, 1:-1] & pad[1:-1, :-2] & pad[1:-1, 2:]
    dim[m & ~inner] = red
    return (dim + 0.5).astype(np.uint8)


def colour_range(maps: Sequence[np.ndarray] | np.ndarray, low_pct: float = 1.0, high_pct: float = 99.9) -> tuple[float, float]:
    """One colour range for a set of maps: the ``low_pct`` and ``high_pct`` percentiles of all
    their values (robust to a few extreme pixels; the top values saturate to dark red)."""
    vals = np.concatenate([np.asarray(m, dtype=np.float32).reshape(-1) for m in maps])
    vals = vals[np.isfinite(vals)]
    if vals.size == 0:
        return 0.0, 1.0
    lo, hi = (float(v) for v in np.percentile(vals, [low_pct, high_pct]))
    if hi <= lo:
        hi = lo + 1e-6
    return lo, hi


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------
def save_png(image: np.ndarray | Image.Image, path: str | os.PathLike) -> Path:
    """Write a PNG atomically: a crash never leaves a half-written picture."""
    path = Path(path)
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    with atomic_open(path, "wb") as f:
        im.save(f, format="PNG")
    return path


# ------------------------------------------------------------------------------------------------
# The picture grid
# ------------------------------------------------------------------------------------------------
def colour_bar(lo: float, hi: float, width: int = 300, height: int = 14, label: str = "anomaly map value") -> Image.Image:
    """A horizontal Turbo colour bar with its end values and a label underneath."""
    font = drawing.font(12)
    bar = turbo(np.linspace(0, 1, width))[None].repeat(height, axis=0)
    canvas = Image.new("RGB", (width + 120, height + 22), "white")
    canvas.paste(Image.fromarray(bar), (60, 2))
    d = ImageDraw.Draw(canvas)
    d.rectangle([60, 2, 60 + width - 1, 2 + height - 1], outline=(90, 90, 90))
    lo_t, hi_t = f"{lo:.3g}", f"{hi:.3g}"
    d.text((56 - drawing.text_width(d, lo_t, font), 2), lo_t, fill="black", font=font)
    d.text((64 + width, 2), hi_t, fill="black", font=font)
    d.text((60 + (width - drawing.text_width(d, label, font)) // 2, height + 5), label, fill=(60, 60, 60), font=font)
    return canvas


def picture_grid(
    items: Sequence[dict],
    lo: float,
    hi: float,
    threshold: float | None = None,
    cell: int | None = None,
    title: str | None = None,
) -> Image.Image:
    """A grid with one column per image and three rows: the image, its ground truth (defect in
    red; none for a normal image) and its anomaly map overlaid (Turbo, one scale ``lo..hi`` for
    all columns, shown by a colour bar underneath).

    ``items``: dicts with ``image`` ((H, W, 3) uint8), ``map`` ((H, W) float), optional ``mask``
    ((H, W) bool), ``label`` (the column's heading, e.g. "good" or "scratch") and ``score``. With
    ``threshold``, each score is written green (below: judged normal) or red (at or above: judged
    anomalous).
    """
    if not items:
        raise ValueError("picture_grid needs at least one item")
    h, w = np.asarray(items[0]["map"]).shape
    if cell is None:
        cell = max(96, min(160, w))
    ch = max(1, round(cell * h / w))
    gap, left, head = 6, 104, 22
    font, small = drawing.font(14), drawing.font(12)
    title_h = 28 if title else 0
    score_h = 18
    rows = ("image", "ground truth", "anomaly map")
    bar = colour_bar(lo, hi, width=min(360, max(160, len(items) * (cell + gap) - 140)))
    width = left + len(items) * (cell + gap)
    height = title_h + head + 3 * (ch + gap) + score_h + gap + bar.height + 6
    canvas = Image.new("RGB", (max(width, bar.width + left), height), "white")
    d = ImageDraw.Draw(canvas)
    if title:
        d.text((8, 6), title, fill="black", font=drawing.font(16))
    top = title_h + head
    for r, name in enumerate(rows):
        y = top + r * (ch + gap) + ch // 2 - 8
        d.text((8, y), name, fill="black", font=font)
    for c, it in enumerate(items):
        x = left + c * (cell + gap)
        label = str(it.get("label", ""))
        colour = (0, 110, 0) if label == "good" else (170, 0, 0)
        d.text((x + (cell - drawing.text_width(d, label, font)) // 2, title_h + 3), label, fill=colour, font=font)
        amap = np.asarray(it["map"], dtype=np.float32)
        img = _as_rgb_u8(it["image"], amap.shape)
        tiles = (img, mask_overlay(img, it.get("mask")), overlay(img, amap, lo, hi))
        for r, tile in enumerate(tiles):
            t = Image.fromarray(tile).resize((cell, ch), Image.BILINEAR)
            canvas.paste(t, (x, top + r * (ch + gap)))
        if it.get("score") is not None:
            s = float(it["score"])
            text = f"score {s:.3g}"
            fill = (60, 60, 60)
            if threshold is not None:
                fill = (190, 0, 0) if s >= threshold else (0, 120, 0)
            d.text((x + (cell - drawing.text_width(d, text, small)) // 2, top + 3 * (ch + gap) - 2), text, fill=fill, font=small)
    canvas.paste(bar, (left, top + 3 * (ch + gap) + score_h))
    return canvas


# ------------------------------------------------------------------------------------------------
# The HTML report
# ------------------------------------------------------------------------------------------------
METRIC_HELP = {key: (name.title, name.help) for key, name in METRIC_TABLE.items()}

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ccc;padding:.3em .7em;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img.grid{max-width:100%;border:1px solid #ccc} .muted{color:#666;font-size:.92em} code{background:#f4f4f4;padding:0 .25em}
"""


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    if v is None:
        return "–"
    return str(v)


def write_html_report(
    path: str | os.PathLike,
    *,
    title: str,
    metrics: dict,
    grid_png: str | os.PathLike | None = None,
    explanation: str = "",
    info: dict | None = None,
    log: Sequence[dict] | None = None,
) -> Path:
    """Write a self-contained HTML report (the grid is embedded, so the file can be mailed):
    the metrics with a line on what each means, the picture grid, an explanation (HTML allowed),
    a table of run facts (``info``) and the training log (one dict per epoch)."""
    path = Path(path)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    if explanation:
        parts.append(explanation)
    parts.append("<h2>Metrics</h2><table><tr><th>metric</th><th>value</th><th>what it means</th></tr>")
    for k, v in metrics.items():
        name, help_ = METRIC_HELP.get(k, (k, ""))
        parts.append(
            f"<tr><td>{html.escape(name)} <span class='muted'>(<code>{html.escape(k)}</code>)</span></td>"
            f"<td class='num'>{html.escape(_fmt(v))}</td><td class='muted'>{html.escape(help_)}</td></tr>"
        )
    parts.append("</table>")
    if grid_png is not None:
        data = base64.b64encode(Path(grid_png).read_bytes()).decode("ascii")
        parts.append(
            "<h2>Test images, ground truth and anomaly maps</h2>"
            f"<p><img class='grid' alt='picture grid' src='data:image/png;base64,{data}'></p>"
            f"<p class='muted'>Also saved as <code>{html.escape(Path(grid_png).name)}</code>.</p>"
        )
    if info:
        parts.append("<h2>Run</h2><table>")
        for k, v in info.items():
            val = json.dumps(v) if isinstance(v, (list, tuple, dict)) else _fmt(v)
            parts.append(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(val)}</td></tr>")
        parts.append("</table>")
    if log:
        cols = [c for c in ("epoch", "d_loss", "g_loss", "recon_loss", "steps", "seconds") if any(c in r for r in log)]
        eval_cols: list[str] = []
        for r in log:
            for k in (r.get("eval") or {}):
                if k not in eval_cols and k in METRIC_HELP and not k.startswith("num_"):
                    eval_cols.append(k)
        parts.append("<h2>Training log</h2><table><tr>")
        parts += [f"<th>{html.escape(c)}</th>" for c in cols + eval_cols]
        parts.append("</tr>")
        for r in log:
            cells = [r.get(c) for c in cols] + [(r.get("eval") or {}).get(c) for c in eval_cols]
            parts.append("<tr>" + "".join(f"<td class='num'>{html.escape(_fmt(v))}</td>" for v in cells) + "</tr>")
        parts.append("</table><p class='muted'>D: discriminator loss (Eq. 11), G: generator loss "
                     "(reconstruction + λ·adversarial, Eq. 13), recon: reconstruction loss (Eq. 2).</p>")
    parts.append("</body></html>\n")
    atomic_write_text(path, "\n".join(parts))
    return path


def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    """PNG-encoded bytes of an image (for embedding)."""
    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()
