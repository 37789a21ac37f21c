"""The promise monitor: a calibrated run that flags far more images than the calibration promises
for normal ones warns and says so in run.json; a run of normal images stays quiet."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from scipy.stats import binom

from ckaad_fast.calibration import Calibration, calibration_from_scores
from ckaad_fast.calibration.thresholds import NORMAL_SCORES_KEPT, kept_normal_scores
from ckaad_fast.scoring import monitor as mon
from ckaad_fast.scoring.results import Verdict

from helpers import tiny_checkpoint, write_pngs

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


def _normal_only(n=200, target=0.05, seed=0):
    scores = np.random.default_rng(seed).normal(1.0, 0.1, n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return calibration_from_scores(np.zeros(n), scores, target), scores


def test_a_calibration_records_its_normal_scores_and_promise():
    cal, scores = _normal_only()
    assert cal.normal_scores == sorted(cal.normal_scores) and len(cal.normal_scores) == 200
    assert cal.normal_scores[0] == pytest.approx(scores.min(), rel=1e-6)
    # At the calibrated threshold: at least the target, and the set's own share counted (k+1)/(n+2).
    k = int((scores >= cal.decision_threshold()).sum())
    assert k <= 10
    assert cal.normal_flag_rate() == pytest.approx(max(0.05, (k + 1) / 202))
    # A higher sensitivity flags more, and promises more.
    assert cal.normal_flag_rate(0.9) > cal.normal_flag_rate()
    # A stored calibration keeps it.
    assert Calibration.from_dict(cal.to_dict()).normal_flag_rate() == cal.normal_flag_rate()
    # Older calibrations: the target at the calibrated threshold, nothing elsewhere.
    old = Calibration.from_dict({**cal.to_dict(), "normal_scores": None})
    assert old.normal_flag_rate() == 0.05 and old.normal_flag_rate(0.9) is None
    many = kept_normal_scores(np.arange(10_000.0))
    assert len(many) == NORMAL_SCORES_KEPT and many[0] == 0 and many[-1] == 9999


def test_the_binomial_test():
    t = mon.promise_test(100, 10, 0.05)
    assert t["p_value"] == pytest.approx(binom.sf(9, 100, 0.05)) and t["expected"] == 5
    assert mon.promise_test(100, 0, 0.05)["p_value"] == 1.0


def test_the_monitor_warns_when_half_are_flagged_and_not_on_normal_images():
    cal, _ = _normal_only()
    rate = cal.normal_flag_rate()
    rng = np.random.default_rng(1)
    normal = list(rng.random(400) < rate)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # quiet: any warning fails
        record = mon.PromiseMonitor(cal, 0.5, len(normal)).finish(normal, [1.0] * len(normal))
    assert not record["test"]["significant"] and record["first_failing_window"] is None
    half = [i % 2 == 0 for i in range(40)]
    with pytest.warns(mon.PromiseWarning, match="20 of 40 images flagged"):
        record = mon.PromiseMonitor(cal, 0.5, 40).finish(half, [1.0] * 40)
    assert record["test"]["significant"] and record["test"]["p_value"] < mon.ALPHA


def test_a_long_run_sees_a_change_in_its_middle():
    cal, _ = _normal_only()
    total = 4000
    rng = np.random.default_rng(2)
    flags = list(rng.random(total) < cal.normal_flag_rate())
    flags[2000:2500] = [True] * 250 + [False] * 250  # half of one window's images flagged
    monitor = mon.PromiseMonitor(cal, 0.5, total)
    with pytest.warns(mon.PromiseWarning, match="of this run"):
        for f in flags:
            monitor.add(f)
    window = monitor.first_window
    assert window is not None and 2000 < window["ends_at_image"] <= 3000
    # The same run without the change: no window fails.
    quiet = mon.PromiseMonitor(cal, 0.5, total)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in rng.random(total) < cal.normal_flag_rate():
            quiet.add(f)
    assert quiet.first_window is None


def test_score_shift():
    cal, scores = _normal_only()
    same = mon.score_shift(scores, cal)
    assert abs(same["shift_in_iqr"]) < 0.05
    moved = mon.score_shift(scores + 0.2, cal)  # 0.2 is about 1.5 interquartile ranges of N(1, 0.1)
    assert moved["shift_in_iqr"] == pytest.approx(0.2 / same["calibration_normal_iqr"], rel=0.05)


def test_a_raw_threshold_promises_nothing():
    cal, _ = _normal_only()
    assert mon.monitor_for(Verdict(threshold=1.0, calibration=cal), 10) is None
    assert mon.monitor_for(Verdict(), 10) is None
    assert mon.monitor_for(Verdict(calibration=cal), 10) is not None


def test_score_warns_on_a_folder_of_half_defects_and_records_it(tmp_path):
    """The whole path: a calibration whose normal images are the lower half of a folder's scores;
    scoring the whole folder flags about half of it and warns, scoring its normal half does not."""
    from ckaad_fast.model import model_from_checkpoint
    from ckaad_fast.scoring import Scorer, score_to_folder

    model = model_from_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt", 32))
    folder = write_pngs(tmp_path / "all", 60, seed=3, size=32)
    scorer = Scorer(model, device="cpu", dtype="float32", engine="torch")
    results = {r.path: r.score for r in scorer.score_folder(folder, return_maps=False)}
    order = sorted(results, key=results.get)
    normal = order[:30]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibration_from_scores(np.zeros(30), [results[p] for p in normal], 0.05,
                                      precision="float32", device="cpu", engine="torch")
    scorer = Scorer(model, device="cpu", calibration=cal)
    with pytest.warns(mon.PromiseWarning, match="images flagged"):
        summary = score_to_folder(scorer, sorted(results), tmp_path / "out", progress=False)
    assert summary.monitor["test"]["significant"] and summary.anomalous >= 25
    record = json.loads((tmp_path / "out" / "run.json").read_text())["monitor"]
    assert record["test"] == summary.monitor["test"] and record["score_shift"]["shift_in_iqr"] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", mon.PromiseWarning)
        quiet = score_to_folder(scorer, sorted(normal), tmp_path / "normal", progress=False)
    assert not quiet.monitor["test"]["significant"]
