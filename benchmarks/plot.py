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
# Each row is drawn with the first of these it has a number for, so that one CSV holding several
# kinds of rows (ops.csv: ms per image for the map, ms for the losses) shows all of them.
VALUE_COLUMNS = [
    ("ms_per_image", "ms/image", "ms per image (lower is better)"),
    ("ms", "ms", "ms (lower is better)"),
    ("seconds", "s", "seconds (lower is better)"),
    ("us", "us", "microseconds (lower is better)"),
    ("images_per_s", "img/s", "images per second (higher is better)"),
    ("speedup", "x", "speed-up (higher is better)"),
]
LABEL_COLUMNS = ["what", "path", "name", "check", "metric", "strategy", "detector"]
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
    return next((c for c in candidates if c in columns), None)


def _label(row, label_col, columns):
    parts = [row.get(label_col, "")] if label_col else []
    for extra in ("bench", "dtype", "batch"):
        if extra in columns and extra != label_col and row.get(extra):
            parts.append(f"{extra}={row[extra]}" if extra == "batch" else row[extra])
    return " | ".join(p for p in parts if p)


def _value(row):
    """(value, unit, title) of the first value column this row has a number for, else None."""
    for col, unit, title in VALUE_COLUMNS:
        try:
            v = float(row.get(col) or "nan")
        except ValueError:
            continue
        if not math.isnan(v):
            return v, unit, title
    return None


def draw(name: str, rows: list[dict], out_path: Path) -> Path | None:
    if not rows:
        return None
    columns = list(dict.fromkeys(k for r in rows for k in r))
    label_col = _pick(columns, LABEL_COLUMNS)
    runs = _latest_runs(rows)
    font = ImageFont.load_default()
    bars, titles = [], []
    for machine, rs in runs.items():
        bars.append(("__header__", machine, None, ""))
        for r in rs:
            picked = _value(r)
            if picked is None:
                continue
            v, unit, title = picked
            titles.append(title)
            bars.append(("bar", _label(r, label_col, columns), v, unit))
    values = [b[2] for b in bars if b[0] == "bar" and b[2] > 0]
    if not values:
        return None
    value_title = "; ".join(dict.fromkeys(titles))
    lo, hi = min(values), max(values)
    lo_log, hi_log = math.log10(lo) - 0.3, math.log10(hi) + 0.1
    label_w, bar_w, row_h = 430, 520, 20
    height = 50 + row_h * len(bars) + 20
    img = Image.new("RGB", (label_w + bar_w + 120, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"{name}: {value_title}", fill="black", font=font)
    d.text((10, 24), "log scale; each machine's latest run", fill=(90, 90, 90), font=font)
    y = 46
    for kind, label, v, unit in bars:
        if kind == "__header__":
            d.text((10, y + 4), label, fill=(20, 60, 140), font=font)
        else:
            d.text((20, y + 4), label[:70], fill="black", font=font)
            frac = 0.0 if v <= 0 else (math.log10(v) - lo_log) / (hi_log - lo_log)
            x1 = label_w + max(2, int(bar_w * min(1.0, frac)))
            d.rectangle([label_w, y + 3, x1, y + row_h - 3], fill=(70, 130, 180))
            d.text((x1 + 6, y + 4), f"{v:.4g} {unit}", fill="black", font=font)
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
