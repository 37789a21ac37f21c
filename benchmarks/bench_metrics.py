"""How much faster are ckaad_fast.metrics than the metric code users otherwise run?

Baselines, all run in this process on the same inputs:

- per-image AUPRO: the CKAAD / RD4AD reference protocol as written in their test scripts (a
  Python loop over 200 thresholds per anomalous image, regions relabelled with
  ``skimage.measure.label`` at every threshold, ``sklearn.metrics.auc``), with the removed
  ``DataFrame.append`` replaced by lists, which is the least change that runs on pandas 2;
- standard AUPRO: the same reference loop (what a CKAAD user runs to get "AUPRO"), and a
  sort-based implementation of the MVTec AD definition (argsort of every pixel, cumulative sums),
  the way the MVTec AD evaluation script computes it;
- pixel AUROC: ``sklearn.metrics.roc_auc_score`` on the flattened masks and maps.

Every row also shows our time in units of a yardstick measured on the same machine: one
``np.sort`` of all the pixel scores, the step that dominates any exact rank-based pixel metric.
It is not a strict floor: a metric that needs only part of the pixels (per-image AUPRO ranks the
anomalous images alone) or sorts float32 keys faster than numpy can beat it.

Inputs are synthetic: random elliptic defects on two thirds of the images, and blurred noise maps
that see the defects partly, in float32 like the maps of the reference scoring path.

Run from the repository root: ``python -m benchmarks.bench_metrics [--quick]``.
"""
from __future__ import annotations

import argparse
import math

import numpy as np
from scipy import ndimage

from benchmarks.common import append_results, best_time, check_agreement, median_time, print_table
from ckaad_fast import metrics


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------
def make_data(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    for i in range(n):
        if i % 3 == 0:
            continue  # a normal image
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(size / 40, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    noise = rng.random((n, size, size), dtype=np.float32)
    signal = masks * rng.uniform(0.2, 1.5, (n, 1, 1)).astype(np.float32)
    maps = ndimage.gaussian_filter(noise + signal, sigma=(0, 4, 4)).astype(np.float32)
    return masks, maps


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------
def reference_pro_one_image(mask: np.ndarray, amap: np.ndarray, num_th: int = 200) -> float:
    """The CKAAD / RD4AD reference protocol for one image, loop for loop, without pandas."""
    from skimage import measure
    from sklearn.metrics import auc

    binary = np.zeros_like(amap, dtype=bool)
    lo, hi = amap.min(), amap.max()
    rows = []
    for th in np.arange(lo, hi, (hi - lo) / num_th):
        binary[amap <= th] = 0
        binary[amap > th] = 1
        pros = []
        for region in measure.regionprops(measure.label(mask)):
            tp = binary[region.coords[:, 0], region.coords[:, 1]].sum()
            pros.append(tp / region.area)
        inverse = 1 - mask
        fpr = np.logical_and(inverse, binary).sum() / inverse.sum()
        rows.append((float(np.mean(pros)), fpr))
    pro, fpr = (np.array(c) for c in zip(*rows))
    keep = fpr < 0.3
    pro, fpr = pro[keep], fpr[keep]
    return auc(fpr / fpr.max(), pro)


def reference_aupro_per_image(masks: np.ndarray, maps: np.ndarray) -> float:
    per_image = [reference_pro_one_image(m.astype(int), a) for m, a in zip(masks, maps) if m.any()]
    return float(np.mean(per_image))


def sort_based_aupro(masks: np.ndarray, maps: np.ndarray, limit: float = 0.3) -> float:
    """The MVTec AD definition the way its evaluation script computes it: argsort every pixel."""
    fpr_step = np.zeros(masks.shape)
    pro_step = np.zeros(masks.shape)
    n_regions = 0
    regions = []
    for i, mask in enumerate(masks):
        lab, n = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append((i, lab, n))
        n_regions += n
    for i, lab, n in regions:
        area = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
        pro_step[i] = np.where(lab > 0, 1.0 / (n_regions * area[lab]), 0.0)
    normal = ~masks.astype(bool)
    fpr_step[normal] = 1.0 / normal.sum()
    order = np.argsort(maps, axis=None, kind="stable")[::-1]
    values = maps.ravel()[order]
    fpr = np.cumsum(fpr_step.ravel()[order])
    pro = np.cumsum(pro_step.ravel()[order])
    last = np.append(np.flatnonzero(np.diff(values) != 0), values.size - 1)
    fpr = np.concatenate(([0.0], fpr[last]))
    pro = np.concatenate(([0.0], pro[last]))
    fpr = np.clip(fpr, 0, 1)
    cut = np.searchsorted(fpr, limit, side="right")
    trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy < 2 has only trapz
    area = trapezoid(pro[:cut], fpr[:cut])
    if fpr[cut - 1] < limit and cut < fpr.size:
        y = pro[cut - 1] + (pro[cut] - pro[cut - 1]) * (limit - fpr[cut - 1]) / (fpr[cut] - fpr[cut - 1])
        area += 0.5 * (pro[cut - 1] + y) * (limit - fpr[cut - 1])
    return float(area / limit)


def sklearn_pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(masks.ravel(), maps.ravel()))


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------
def _diff_text(row: dict) -> str:
    if row["metric"].startswith("evaluate"):
        return "-"
    return "different metric" if math.isnan(row["abs_diff"]) else f"{row['abs_diff']:.1e}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny inputs, a few seconds (CI)")
    parser.add_argument("--images", type=int, default=None, help="number of maps (default 40)")
    parser.add_argument("--size", type=int, default=None, help="map side (default 256)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls of the fast code")
    parser.add_argument("--no-save", action="store_true", help="do not append to results/metrics.csv")
    args = parser.parse_args(argv)
    n = args.images or (6 if args.quick else 40)
    size = args.size or (64 if args.quick else 256)
    repeats = args.repeats or (3 if args.quick else 7)

    try:
        import sklearn  # noqa: F401
        import skimage  # noqa: F401
    except ImportError as exc:
        raise SystemExit(f"the baselines need scikit-learn and scikit-image: {exc}") from exc

    masks, maps = make_data(n, size)
    labels = masks.reshape(n, -1).any(axis=1)
    scores = maps.reshape(n, -1).max(axis=1)
    n_anom = int(labels.sum())
    print(f"{n} maps of {size}x{size} ({n * size * size / 1e6:.2f} M pixels), {n_anom} with defects")

    def fast(fn):
        return median_time(lambda i: fn(masks, maps), repeats=repeats, warmup=1)

    def slow(fn):
        # The baselines take seconds: one timed call after no warm-up is representative enough.
        return median_time(lambda i: fn(masks, maps), repeats=1 if not args.quick else 2, warmup=0)

    ours = {
        "aupro_per_image": metrics.aupro_per_image(masks, maps),
        "aupro": metrics.aupro(masks, maps),
        "pixel_auroc": metrics.pixel_auroc(masks, maps),
    }
    base = {
        "reference loop": reference_aupro_per_image(masks, maps),
        "sort-based (MVTec AD)": sort_based_aupro(masks, maps),
        "sklearn roc_auc_score": sklearn_pixel_auroc(masks, maps),
    }
    t = {
        "aupro_per_image": fast(metrics.aupro_per_image),
        "aupro": fast(metrics.aupro),
        "pixel_auroc": fast(metrics.pixel_auroc),
        "evaluate": median_time(
            lambda i: metrics.evaluate(labels, scores, masks, maps), repeats=repeats, warmup=1
        ),
        "reference loop": slow(reference_aupro_per_image),
        "sort-based (MVTec AD)": slow(sort_based_aupro),
        "sklearn roc_auc_score": slow(sklearn_pixel_auroc),
    }
    t_sort = best_time(lambda i: np.sort(maps, axis=None), repeats=repeats, warmup=1)
    t_all_baselines = t["reference loop"] + t["sort-based (MVTec AD)"] + t["sklearn roc_auc_score"]

    # (metric, ours key, baseline name, same metric?)
    cases = [
        ("aupro_per_image", "aupro_per_image", "reference loop", True),
        ("aupro (standard)", "aupro", "sort-based (MVTec AD)", True),
        ("aupro (standard)", "aupro", "reference loop", False),
        ("pixel_auroc", "pixel_auroc", "sklearn roc_auc_score", True),
    ]
    rows = []
    for metric, key, baseline, same in cases:
        diff = abs(ours[key] - base[baseline]) if same else math.nan
        if same:  # the same metric: equal up to float64 rounding
            check_agreement(f"{metric} vs {baseline}", diff, 1e-9)
        rows.append(
            {
                "metric": metric,
                "baseline": baseline,
                "images": n,
                "size": size,
                "baseline_s": t[baseline],
                "ours_s": t[key],
                "speedup": t[baseline] / t[key],
                "sorts": t[key] / t_sort,
                "abs_diff": diff,
                "value": ours[key],
            }
        )
    rows.append(
        {
            "metric": "evaluate (all)",
            "baseline": "all three baselines",
            "images": n,
            "size": size,
            "baseline_s": t_all_baselines,
            "ours_s": t["evaluate"],
            "speedup": t_all_baselines / t["evaluate"],
            "sorts": t["evaluate"] / t_sort,
            "abs_diff": math.nan,
            "value": math.nan,
        }
    )

    columns = ["metric", "baseline", "baseline (s)", "ours (s)", "speed-up", "ours in sorts of all pixels",
               "|ours - baseline|"]
    print_table(
        f"ckaad_fast.metrics vs baselines, {n} maps of {size}x{size}, CPU; one np.sort of every pixel score "
        f"{t_sort:.3g} s",
        columns,
        [
            [
                r["metric"],
                r["baseline"],
                r["baseline_s"],
                r["ours_s"],
                f"{r['speedup']:.0f}x" if r["speedup"] >= 10 else f"{r['speedup']:.1f}x",
                r["sorts"],
                _diff_text(r),
            ]
            for r in rows
        ],
    )
    if not args.no_save:
        path = append_results("metrics", rows)
        print(f"appended {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
