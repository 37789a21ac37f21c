"""Draw the benchmark CSVs as PNG bar charts a reader can look at.

``python -m benchmarks.plot`` reads every ``benchmarks/results/<name>.csv`` and writes
``benchmarks/results/<name>.png``: for each machine, the rows of its latest run, one horizontal
bar per row, log-scaled so that a 20x gap and a 1.1x gap are both readable. Drawn with Pillow
(already a dependency), so no plotting library is needed.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
from collections import defaultdict
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

RESULTS_DIR = Path(__file__).resolve().parent / "results"
# The value to draw, by preference: a time (lower is better) or a rate (higher is better).
VALUE_COLUMNS = [
    ("ms_per_image", "ms per image (lower is better)"),
    ("ms", "ms (lower is better)"),
    ("seconds", "seconds (lower is better)"),
    ("us", "microseconds (lower is better)"),
    ("images_per_s", "images per second (higher is better)"),
    ("speedup", "speed-up (higher is better)"),
]
LABEL_COLUMNS = ["path", "name", "check", "metric", "strategy", "detector"]
SKIP_LABELS = {"machine", "commit", "date", "torch"}


def _latest_runs(rows):
    """Rows of each machine's latest (commit, date) run."""
    by_machine = defaultdict(list)
    for r in rows:
        by_machine[r.get("machine", "?")].append(r)
    out = {}
    for machine, rs in by_machine.items():
        last = max(r.get("date", "") for r in rs)
        out[machine] = [r for r in rs if r.get("date", "") == last]
    return out


def _pick(columns, candidates):
    for c in candidates:
        name = c[0] if isinstance(c, tuple) else c
        if name in columns:
            return c
    return None


def _label(row, label_col, columns):
    parts = [row.get(label_col, "")] if label_col else []
    for extra in ("bench", "dtype", "batch"):
        if extra in columns and extra != label_col and row.get(extra):
            parts.append(f"{extra}={row[extra]}" if extra == "batch" else row[extra])
    return " | ".join(p for p in parts if p)


def draw(name: str, rows: list[dict], out_path: Path) -> Path | None:
    if not rows:
        return None
    columns = list(rows[0])
    value = _pick(columns, VALUE_COLUMNS)
    if value is None:
        return None
    value_col, value_title = value
    label_col = _pick(columns, LABEL_COLUMNS)
    runs = _latest_runs(rows)
    font = ImageFont.load_default()
    bars = []
    for machine, rs in runs.items():
        bars.append(("__header__", machine, None))
        for r in rs:
            try:
                v = float(r[value_col])
            except (TypeError, ValueError):
                continue
            bars.append(("bar", _label(r, label_col, columns), v))
    values = [b[2] for b in bars if b[0] == "bar" and b[2] > 0]
    if not values:
        return None
    lo, hi = min(values), max(values)
    lo_log, hi_log = math.log10(lo) - 0.3, math.log10(hi) + 0.1
    label_w, bar_w, row_h = 430, 520, 20
    height = 50 + row_h * len(bars) + 20
    img = Image.new("RGB", (label_w + bar_w + 120, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"{name}: {value_title}", fill="black", font=font)
    d.text((10, 24), "log scale; each machine's latest run", fill=(90, 90, 90), font=font)
    y = 46
    for kind, label, v in bars:
        if kind == "__header__":
            d.text((10, y + 4), label, fill=(20, 60, 140), font=font)
        else:
            d.text((20, y + 4), label[:70], fill="black", font=font)
            frac = 0.0 if v <= 0 else (math.log10(v) - lo_log) / (hi_log - lo_log)
            x1 = label_w + max(2, int(bar_w * min(1.0, frac)))
            d.rectangle([label_w, y + 3, x1, y + row_h - 3], fill=(70, 130, 180))
            d.text((x1 + 6, y + 4), f"{v:.4g}", fill="black", font=font)
        y += row_h
    tmp = out_path.with_suffix(".png.tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, out_path)
    return out_path


def main(argv=None):
    parser = argparse.ArgumentParser(description="Draw benchmarks/results/*.csv as PNG bar charts.")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR, help="folder of CSVs (default benchmarks/results)")
    args = parser.parse_args(argv)
    written = []
    for path in sorted(args.results.glob("*.csv")):
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        out = draw(path.stem, rows, path.with_suffix(".png"))
        if out:
            written.append(out)
            print(f"wrote {out}")
    if not written:
        print(f"no CSV with a numeric time or rate column under {args.results}")
    return 0


if __name__ == "__main__":
    main()
