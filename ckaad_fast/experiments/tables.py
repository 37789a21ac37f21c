"""The numbers of finished runs as the paper's tables: flat CSV rows and Markdown.

Averaging, as the paper does: on class-labelled data, the runs of one seed (one per anomaly
class for k = 1, one per draw for k > 1) are averaged first; on industrial data, the categories of
one seed (the table's mean row). The mean and the sample standard deviation over seeds are then
shown as ``mean ± std`` (std only with two seeds or more). Values are percentages.
"""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..atomic import atomic_write_text
from ..metrics import METRIC_TABLE
from .paired import BASELINE, paired_difference

__all__ = ["STRATEGY_NAMES", "MEDICAL_COLUMNS", "INDUSTRIAL_COLUMNS", "result_rows", "by_defect_rows",
           "markdown", "write_csv", "aggregate"]

#: The paper's names of the strategies (Table 3).
STRATEGY_NAMES = {"recon": "Recon", "recon_sub": "ReconSub", "gan": "GAN", "cka_img": "CKAImg",
                  "cka_patch": "CKAPatch"}
#: Class-labelled data: metric key -> column. F1/ACC: at the test set's best-F1 threshold (the
#: authors' code and the paper); "(val)": at the validation split's best-F1 threshold.
MEDICAL_COLUMNS = {"image_auroc": "AUC", "image_f1": "F1", "image_acc": "ACC", "image_f1_val": "F1 (val)",
                   "image_acc_val": "ACC (val)"}
INDUSTRIAL_COLUMNS = {k: METRIC_TABLE[k].column for k in ("image_auroc", "pixel_auroc", "aupro", "aupro_per_image",
                                                          "aupimo")}
_DEFECT_COLUMNS = {k: METRIC_TABLE[k].column for k in ("image_auroc", "pixel_auroc", "aupro")}
_FLAT = ("run_id", "category", "strategy", "ratio_labeled", "anomaly_classes", "draw", "seed", "protocol", "epochs",
         "batch_size", "backbone", "image_size", "num_train", "num_labelled_anomalies", "num_validation",
         "image_auroc", "image_f1", "image_acc", "image_f1_val", "image_acc_val", "val_threshold", "pixel_auroc",
         "aupro", "aupro_per_image", "aupimo", "num_images", "num_anomalous", "train_seconds", "eval_seconds")


def _cell(v):
    if isinstance(v, (list, tuple)):
        return "+".join(str(x) for x in v)
    return "" if v is None else v


def result_rows(rows: list[dict]) -> list[dict]:
    """One flat dict per run (the columns of results.csv)."""
    out = [{k: _cell(r.get(k)) for k in _FLAT} for r in rows]
    for flat, r in zip(out, rows):
        flat["image_size"] = "x".join(str(v) for v in r.get("image_size") or ())
    return out


def by_defect_rows(rows: list[dict]) -> list[dict]:
    """One flat dict per (run, defect type): its images against the normal ones, and whether the
    run's labelled anomalies were of that type (``seen``; empty where the run drew none by class)."""
    out = []
    for r in rows:
        seen_classes = set(r.get("anomaly_classes") or ())
        for t, m in (r.get("by_defect_type") or {}).items():
            out.append({"run_id": r["run_id"], "category": _cell(r.get("category")), "strategy": r["strategy"],
                        "ratio_labeled": r["ratio_labeled"], "seed": r["seed"], "defect_type": t,
                        "seen": ("yes" if t in seen_classes else "no") if seen_classes else "",
                        **{k: _cell(m.get(k)) for k in ("image_auroc", "pixel_auroc", "aupro", "num_anomalous")}})
    return out


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """``rows`` as a CSV (header from the first row), written atomically; no rows: a header-less empty file."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


# -- averaging ------------------------------------------------------------------------------------
def aggregate(rows: list[dict], key, metrics) -> dict:
    """key(row) -> {metric: (mean over seeds, std over seeds or None, number of seeds)}, where each
    seed's value is the mean of its rows with that key (classes, draws or categories)."""
    per_seed: dict = defaultdict(lambda: defaultdict(list))
    for r in rows:
        per_seed[key(r)][r["seed"]].append(r)
    out = {}
    for k, seeds in per_seed.items():
        stats = {}
        for m in metrics:
            vals = [np.mean([x[m] for x in rs]) for rs in seeds.values() if all(x.get(m) is not None for x in rs)]
            if vals:
                stats[m] = (float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else None, len(vals))
        out[k] = stats
    return out


def _fmt(stat) -> str:
    if stat is None:
        return "–"
    mean, std, _ = stat
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if std is not None else "")


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(row) + " |" for row in body]


def _order(rows: list[dict], field: str) -> list:
    return list(dict.fromkeys(r[field] for r in rows))


# -- the tables -----------------------------------------------------------------------------------
def _medical(exp, rows: list[dict]) -> list[str]:
    stats = aggregate(rows, lambda r: (r["ratio_labeled"], r["strategy"]), MEDICAL_COLUMNS)
    body = []
    for ratio in sorted({k[0] for k in stats}):
        for s in exp.strategies:
            if (ratio, s) in stats:
                st = stats[(ratio, s)]
                body.append([f"{100 * ratio:g}%", STRATEGY_NAMES.get(s, s)] + [_fmt(st.get(m)) for m in MEDICAL_COLUMNS])
    return _table(["r_l", "Strategy", *MEDICAL_COLUMNS.values()], body)


def _industrial_by_category(exp, rows: list[dict]) -> list[str]:
    per_cat = aggregate(rows, lambda r: (r["strategy"], r["category"]), INDUSTRIAL_COLUMNS)
    mean = aggregate(rows, lambda r: r["strategy"], INDUSTRIAL_COLUMNS)
    several = len(exp.strategies) > 1
    body = []
    for s in exp.strategies:
        name = [STRATEGY_NAMES.get(s, s)] if several else []
        for c in _order(rows, "category"):
            if (s, c) in per_cat:
                body.append(name + [str(c)] + [_fmt(per_cat[(s, c)].get(m)) for m in INDUSTRIAL_COLUMNS])
        if s in mean:
            body.append(name + ["**Mean**"] + [_fmt(mean[s].get(m)) for m in INDUSTRIAL_COLUMNS])
    return _table((["Strategy"] if several else []) + ["Category", *INDUSTRIAL_COLUMNS.values()], body)


def _industrial_by_strategy(exp, rows: list[dict]) -> list[str]:
    mean = aggregate(rows, lambda r: r["strategy"], INDUSTRIAL_COLUMNS)
    body = [[STRATEGY_NAMES.get(s, s)] + [_fmt(mean[s].get(m)) for m in INDUSTRIAL_COLUMNS]
            for s in exp.strategies if s in mean]
    return _table(["Strategy", *INDUSTRIAL_COLUMNS.values()], body)


def _by_defect(exp, rows: list[dict]) -> list[str]:
    flat = [{**d, **{k: (None if d[k] == "" else float(d[k])) for k in _DEFECT_COLUMNS}} for d in by_defect_rows(rows)]
    if not flat:
        return []
    stats = aggregate(flat, lambda d: (d["strategy"], d["category"], d["defect_type"], d["seen"]), _DEFECT_COLUMNS)
    cols = [m for m in _DEFECT_COLUMNS if any(m in st for st in stats.values())]
    seen = any(k[3] for k in stats)
    body = []
    for (s, c, t, sn) in sorted(stats, key=lambda k: (exp.strategies.index(k[0]), str(k[1]), k[2], k[3])):
        cells = [STRATEGY_NAMES.get(s, s)] + ([str(c)] if c else []) + [t] + ([sn] if seen else [])
        body.append(cells + [_fmt(stats[(s, c, t, sn)].get(m)) for m in cols])
    has_cat = any(k[1] for k in stats)
    header = ["Strategy"] + (["Category"] if has_cat else []) + ["Defect type"] + (["Seen"] if seen else [])
    return _table(header + [_DEFECT_COLUMNS[m] for m in cols], body)


def _paired_cell(d) -> str:
    if d is None:
        return "–"
    if d.low is None:
        return f"{100 * d.mean:+.2f} (1 seed)"
    return f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}] p={d.p:.2g}"


def _paired(exp, rows: list[dict]) -> list[str]:
    """Each strategy against the baseline, paired by seed (see .paired), per r_l on class-labelled data."""
    others = [s for s in exp.strategies if s != BASELINE]
    if BASELINE not in exp.strategies or not others:
        return []
    columns = MEDICAL_COLUMNS if exp.class_labelled else INDUSTRIAL_COLUMNS
    ratios = sorted({r["ratio_labeled"] for r in rows if r["strategy"] != BASELINE}) if exp.class_labelled else [None]
    body = []
    for ratio in ratios:
        where = None if ratio is None else (lambda r, ratio=ratio: r["ratio_labeled"] == ratio)
        for s in others:
            cells = [_paired_cell(paired_difference(rows, s, m, BASELINE, where)) for m in columns]
            if any(c != "–" for c in cells):
                body.append(([f"{100 * ratio:g}%"] if ratio is not None else []) + [STRATEGY_NAMES.get(s, s)] + cells)
    if not body:
        return []
    header = (["r_l"] if exp.class_labelled else []) + ["Strategy", *columns.values()]
    return ["", f"## Against {STRATEGY_NAMES.get(BASELINE, BASELINE)}, paired by seed", "",
            f"Each run minus the {STRATEGY_NAMES.get(BASELINE, BASELINE)} run of the same seed on the same data, "
            "in points: the mean over seeds, its 95% confidence interval (Student's t) and the paired t-test's "
            "p-value. An interval that holds 0 means these runs cannot tell the strategy from the baseline: "
            "more seeds narrow it (docs/REPRODUCING.md says how many a claim of a given size needs).", ""
            ] + _table(header, body)


def markdown(exp, rows: list[dict]) -> str:
    """The experiment's table (and its per-defect-type table) as Markdown, with what it shows."""
    seeds = sorted({r["seed"] for r in rows})
    data = exp.layout + (f" ({', '.join(exp.categories)})" if exp.categories else "")
    lines = [f"# {exp.table}: {data}", "",
             f"{len(rows)} runs, seeds {', '.join(map(str, seeds)) or '–'}; protocol `{exp.protocol}`; "
             f"values in %, mean ± sample std over seeds.", ""]
    if not rows:
        return "\n".join(lines + ["No run has finished yet.", ""])
    if exp.class_labelled:
        k = exp.num_classes
        lines += _medical(exp, rows) + ["", f"k = {k}: " + (
            "the mean over the anomaly classes (one run per class j, labelled anomalies of class j only)"
            if k == 1 else f"the mean over {exp.draws} random draws of {k} classes") + ". F1 and ACC: at the test "
            "set's best-F1 threshold (the authors' code, the paper's numbers); (val): at the validation "
            "split's best-F1 threshold, fixed before the test set is seen."]
    elif exp.table == "table2":
        lines += _industrial_by_category(exp, rows)
    else:
        lines += _industrial_by_strategy(exp, rows) + ["", "The mean over the categories."]
    if exp.layout in ("mvtec", "visa"):
        lines += ["", "PRO (FPR≤0.3): the standard AUPRO (MVTec AD); PRO (per image): the CKAAD/RD4AD "
                  "reference code's per-image protocol. They are different metrics."]
    lines += _paired(exp, rows)
    defect = _by_defect(exp, rows)
    if defect:
        lines += ["", "## By defect type", "", "Each defect type's test images against the normal ones"
                  + ("; seen: the run's labelled anomalies were of this type." if exp.class_labelled else ".")
                  + "", ""] + defect
    return "\n".join(lines) + "\n"
