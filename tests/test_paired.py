"""Paired comparisons in experiment tables: each strategy's runs minus their Recon twins (same
seed, same data), the mean over seeds with Student's t interval and the paired t-test's p,
checked against scipy's own paired test on the per-seed values."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from ckaad_fast.experiments import Experiment, markdown
from ckaad_fast.experiments.paired import paired_difference


def _row(strategy, seed, category, auc, ratio=0.0, classes=()):
    return {"run_id": f"{category}-{strategy}-{seed}-{ratio}", "seed": seed, "strategy": strategy,
            "ratio_labeled": ratio, "anomaly_classes": list(classes), "category": category, "draw": 0,
            "image_auroc": auc, "pixel_auroc": auc, "aupro": auc, "aupro_per_image": auc}


def _industrial(seeds=5, effect=0.01, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(seeds):
        for c in ("brick", "grass"):
            base = 0.8 + 0.1 * rng.random()  # what the seed does to both strategies
            rows.append(_row("recon", s, c, base))
            rows.append(_row("cka_patch", s, c, base + effect + 0.02 * rng.standard_normal()))
    return rows


def test_the_paired_difference_is_scipys_paired_t_test_on_the_per_seed_means():
    rows = _industrial()
    got = paired_difference(rows, "cka_patch", "image_auroc")
    # Each seed: the mean over its categories, for both strategies; then scipy's paired test.
    per_seed = {st: [np.mean([r["image_auroc"] for r in rows if r["strategy"] == st and r["seed"] == s])
                     for s in range(5)] for st in ("cka_patch", "recon")}
    ref = stats.ttest_rel(per_seed["cka_patch"], per_seed["recon"])
    ci = ref.confidence_interval(0.95)
    assert got.n == 5
    assert got.mean == pytest.approx(np.mean(np.subtract(per_seed["cka_patch"], per_seed["recon"])), abs=1e-12)
    assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=1e-12)
    assert got.p == pytest.approx(ref.pvalue, rel=1e-9)


def test_twins_are_matched_by_seed_and_data_and_unmatched_runs_are_left_out():
    rows = [_row("recon", s, "brick", 0.8 + 0.01 * s) for s in range(3)]
    rows += [_row("cka_patch", s, "brick", 0.8 + 0.01 * s + 0.02) for s in range(3)]
    rows.append(_row("cka_patch", 9, "brick", 0.1))  # a seed the baseline never ran: no twin
    got = paired_difference(rows, "cka_patch", "image_auroc")
    # The same +0.02 on every seed: no noise left, an interval of one point, p = 0.
    assert got.n == 3 and got.mean == pytest.approx(0.02) and got.p < 1e-9  # rounding is all that varies
    assert got.low == pytest.approx(0.02) and got.high == pytest.approx(0.02)
    one = paired_difference(rows[:1] + rows[3:4], "cka_patch", "image_auroc")
    assert one.n == 1 and one.low is None and one.p is None
    assert paired_difference(rows, "gan", "image_auroc") is None


def test_class_labelled_runs_pair_with_the_one_recon_run_of_their_seed():
    rows = []
    for s in range(4):
        rows.append(_row("recon", s, "", 0.7 + 0.05 * s))  # recon: once per seed, at the first r_l
        for ratio, lift in ((0.05, 0.03), (0.1, 0.06)):
            for cls in ("a", "b"):
                rows.append(_row("cka_patch", s, "", 0.7 + 0.05 * s + lift + (0.01 if cls == "a" else -0.01),
                                 ratio, (cls,)))
    for ratio, lift in ((0.05, 0.03), (0.1, 0.06)):
        got = paired_difference(rows, "cka_patch", "image_auroc", where=lambda r, x=ratio: r["ratio_labeled"] == x)
        assert got.n == 4 and got.mean == pytest.approx(lift) and got.p < 1e-9  # no noise but rounding


def test_the_table_says_what_it_can_and_cannot_tell(tmp_path):
    exp = Experiment("table3", "mvtec", str(tmp_path), strategies=("recon", "cka_patch"), seeds=tuple(range(5)))
    md = markdown(exp, _industrial(effect=0.0))
    assert "## Against Recon, paired by seed" in md
    d = paired_difference(_industrial(effect=0.0), "cka_patch", "image_auroc")
    assert d.low < 0 < d.high  # no effect: the interval holds 0
    cell = f"{100 * d.mean:+.2f} [{100 * d.low:+.2f}, {100 * d.high:+.2f}] p={d.p:.2g}"
    assert f"| CKAPatch | {cell} |" in md
    strong = paired_difference(_industrial(effect=0.05), "cka_patch", "image_auroc")
    assert strong.low > 0 and strong.p < 0.01  # five points on five seeds: told apart
    alone = markdown(Experiment("table3", "mvtec", str(tmp_path), strategies=("cka_patch",)), _industrial())
    assert "paired by seed" not in alone  # no baseline in the experiment: nothing to pair with
