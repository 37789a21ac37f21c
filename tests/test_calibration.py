"""Calibrated decisions: thresholds picked on held-out data, normalised scores, and the CLI's
calibrate -> score path."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from ckaad_fast.calibration import (
    Calibration,
    calibration_from_scores,
    read_calibration,
    threshold_at_fpr,
    write_calibration,
)
from ckaad_fast.cli import main
from ckaad_fast.errors import ArgumentError
from ckaad_fast.model import load_checkpoint

from helpers import read_rows, tiny_checkpoint, write_pngs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_threshold_at_1_percent_fpr_holds_on_fresh_normal_data():
    rng = np.random.default_rng(0)
    t = threshold_at_fpr(rng.normal(size=2000), 0.01)
    fresh = rng.normal(size=200_000)
    # The empirical quantile of 2000 draws: 1% within three binomial standard errors.
    assert abs((fresh >= t).mean() - 0.01) <= 3 * math.sqrt(0.01 * 0.99 / 2000)
    # On the calibration set itself, never more than the target (ties included).
    tied = np.repeat(np.arange(50.0), 4)
    assert (tied >= threshold_at_fpr(tied, 0.05)).mean() <= 0.05


def test_f1_calibration_is_sklearns_best_f1_threshold():
    from sklearn.metrics import precision_recall_curve

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 300)
    scores = rng.normal(size=300) + 1.2 * labels
    cal = calibration_from_scores(labels, scores)
    p, r, th = precision_recall_curve(labels, scores)
    f1 = 2 * p * r / (p + r + 1e-16)
    assert cal.method == "f1" and cal.image_threshold == pytest.approx(th[np.argmax(f1[:-1])])
    assert (cal.num_normal, cal.num_anomalous) == (int((labels == 0).sum()), int(labels.sum()))


def test_normalised_scores_are_monotone_with_the_threshold_at_one_half():
    cal = Calibration(image_threshold=1.5, score_min=0.5, score_max=2.5, method="fpr", target_fpr=0.01)
    s = np.linspace(-5, 10, 1001)
    n = cal.normalize(s)
    assert np.all(np.diff(n) >= 0) and n.min() == 0.0 and n.max() == 1.0
    assert cal.normalize(1.5) == 0.5 and cal.is_anomalous(1.5) and not cal.is_anomalous(1.4999)
    assert cal.is_anomalous(0.6, sensitivity=1.0) and not cal.is_anomalous(2.4, sensitivity=0.0)


@pytest.mark.parametrize("labels, scores, fpr, name, words", [
    ([], [], 0.01, "data", "empty"),
    ([1, 1, 1], [0.1, 0.2, 0.3], 0.01, "data", "no normal image"),
    ([0, 0, 1], [0.1, float("nan"), 0.3], 0.01, "data", "no finite score"),
    ([0] * 50, list(range(50)), 0.01, "data", "at least 100 normal images"),
    ([0] * 50, list(range(50)), 1.5, "target_fpr", "(0, 1)"),
    ([0] * 200, [0.7] * 200, 0.01, "data", "got the same score"),
])
def test_bad_calibration_sets_are_refused_naming_the_argument(labels, scores, fpr, name, words):
    with pytest.raises(ArgumentError) as e:
        calibration_from_scores(labels, scores, fpr)
    assert e.value.name == name and words in e.value.message


def test_a_stored_calibration_with_no_score_range_is_refused():
    with pytest.raises(ValueError, match="must exceed score_min"):
        Calibration(image_threshold=1.0, score_min=1.0, score_max=1.0, method="fpr", target_fpr=0.01)


# -- the command line ------------------------------------------------------------------------------
SIZE = 32


@pytest.fixture
def ckpt(tmp_path):
    return tiny_checkpoint(tmp_path / "tiny.pt", SIZE, "recon", epoch=3, note="kept")


def _pngs(folder, n, seed):
    return write_pngs(folder, n, seed, SIZE)


_rows = read_rows


def test_calibrate_then_score_gives_normalised_scores_and_decisions(ckpt, tmp_path, capsys):
    normal = _pngs(tmp_path / "good", 100, 0)
    assert main(["calibrate", "--checkpoint", str(ckpt), "--normal", str(normal), "--quiet"]) == 0
    assert "false-positive rate 1%" in capsys.readouterr().out
    raw = load_checkpoint(ckpt)
    cal = read_calibration(raw)
    assert cal.method == "fpr" and cal.num_normal == 100
    assert raw["epoch"] == 3 and raw["note"] == "kept"  # everything else the checkpoint held is kept
    test = _pngs(tmp_path / "line", 6, 1)
    out = tmp_path / "out"
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(test), "--out", str(out), "--num-workers", "0",
                 "--no-progress"]) == 0
    rows = _rows(out)
    # A normal-only set picks the pixel threshold at a pixel false-positive rate: rows get regions.
    assert cal.pixel_method == "fpr" and cal.pixel_fpr == 1e-4 and cal.pixel_threshold is not None
    assert list(rows[0]) == ["path", "score", "normalized_score", "error", "is_anomalous", "regions"]
    assert all(isinstance(json.loads(r["regions"]), list) for r in rows)
    for r in rows:
        assert float(r["normalized_score"]) == pytest.approx(cal.normalize(float(r["score"])), abs=1e-6)
        assert r["is_anomalous"] == str(float(r["score"]) >= cal.image_threshold)
    # The sensitivity moves the decision without calibrating again.
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(test), "--out", str(out), "--num-workers", "0",
                 "--no-progress", "--overwrite", "--sensitivity", "1"]) == 0
    assert {r["is_anomalous"] for r in _rows(out)} == {"True"}


def test_calibration_needs_held_out_data_and_says_so(ckpt, tmp_path, capsys):
    few = _pngs(tmp_path / "few", 12, 0)
    assert main(["calibrate", "--checkpoint", str(ckpt), "--normal", str(few), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--data/--normal" in err and "at least 100" in err and err.strip().count("\n") == 0
    assert read_calibration(load_checkpoint(ckpt)) is None  # nothing written
    assert main(["calibrate", "--checkpoint", str(ckpt), "--data", str(tmp_path), "--split", "test"]) == 2
    assert "never calibrate on the test split" in capsys.readouterr().err


def test_calibration_inputs_are_refused_before_anything_is_scored(ckpt, tmp_path, capsys, monkeypatch):
    import ckaad_fast.calibration.run as calibration  # where calibrate() scores

    def no_scoring(*a, **k):
        raise AssertionError("scored before refusing")

    monkeypatch.setattr(calibration, "predict_dataset", no_scoring)
    base = ["calibrate", "--checkpoint", str(ckpt), "--quiet"]
    # The training images (their scores are lower than fresh ones'), and a split the layout lacks.
    assert main(base + ["--data", str(tmp_path), "--category", "x", "--split", "train"]) == 2
    assert "--split" in (err := capsys.readouterr().err) and "learnt from" in err and "--normal DIR" in err
    assert main(base + ["--data", str(tmp_path), "--category", "x"]) == 2
    assert "has no 'val' split" in (err := capsys.readouterr().err) and "--normal DIR" in err
    # Too few normal images for the rate, and an --out that is a folder: before scoring.
    assert main(base + ["--normal", str(_pngs(tmp_path / "few", 12, 0))]) == 2
    assert "at least 100" in capsys.readouterr().err
    assert main(base + ["--normal", str(_pngs(tmp_path / "many", 10, 1)), "--target-fpr", "0.1",
                        "--out", str(tmp_path)]) == 2
    assert "--out" in (err := capsys.readouterr().err) and "is a folder" in err
    assert read_calibration(load_checkpoint(ckpt)) is None  # nothing written


def test_checkpoints_without_calibration_score_as_before(ckpt, tmp_path):
    test = _pngs(tmp_path / "line", 3, 1)
    out = tmp_path / "out"
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(test), "--out", str(out), "--num-workers", "0",
                 "--no-progress"]) == 0
    assert list(_rows(out)[0]) == ["path", "score", "error"]


def test_write_calibration_to_another_file_leaves_the_original(ckpt, tmp_path):
    cal = Calibration(image_threshold=1.0, score_min=0.0, score_max=2.0, method="f1", num_normal=3, num_anomalous=2)
    other = tmp_path / "calibrated.pt"
    write_calibration(ckpt, cal, out=other)
    assert read_calibration(load_checkpoint(ckpt)) is None
    assert read_calibration(load_checkpoint(other)) == cal
    assert os.path.getsize(other) > 0


def test_train_calibrate_holds_data_out_and_stores_the_decision(tmp_path, capsys):
    from ckaad_fast.data.synthetic import make_texture_dataset

    root = make_texture_dataset(tmp_path / "data", "gravel", n_train=10, n_test_good=2, n_test_defect=1, n_coarse=4,
                                image_size=SIZE, seed=0)
    out = tmp_path / "run"
    rc = main(["train", "--data", str(root), "--category", "gravel", "--backbone", "efficientnet_lite0",
               "--layers", "1", "2", "--weights", "none", "--image-size", str(SIZE), "--epochs", "1",
               "--batch-size", "2", "--anomaly-dir", str(root / "gravel" / "coarse_anomalies"), "--calibrate",
               "--calibrate-share", "0.25", "--out", str(out), "--quiet"])
    assert rc == 0 and "calibration: image threshold" in capsys.readouterr().out
    cal = read_calibration(load_checkpoint(out))
    # 25% of the 10 normal images and of the 4 coarse anomalies, never trained on: best F1 on them.
    assert cal.method == "f1" and (cal.num_normal, cal.num_anomalous) == (2, 1)
    assert load_checkpoint(out)["history"][-1]["steps"] == 4  # 8 normal images left, batch 2


def test_split_for_calibration_is_deterministic_and_disjoint(tmp_path):
    from ckaad_fast.calibration import split_for_calibration

    data = list(range(20))
    a = split_for_calibration(data, None, 0.2, seed=3, target_fpr=0.25)
    b = split_for_calibration(data, None, 0.2, seed=3, target_fpr=0.25)
    assert list(a[0].indices) == list(b[0].indices) and len(a[2]) == 4
    assert not set(a[0].indices) & set(a[2].datasets[0].dataset.indices)
    with pytest.raises(ArgumentError) as e:
        split_for_calibration(data[:1], None, 0.5)
    assert e.value.name == "calibrate_share"
    # Normal images only, too few for the rate: refused before any training, not after it.
    with pytest.raises(ArgumentError) as e:
        split_for_calibration(list(range(300)), None, 0.1, target_fpr=0.01)
    assert "needs at least 100" in e.value.message
    assert len(split_for_calibration(list(range(300)), None, 0.1, target_fpr=0.05)[2]) == 30


def test_masks_from_the_calibrated_pixel_threshold(ckpt, tmp_path, capsys):
    test = _pngs(tmp_path / "line", 3, 1)
    out = tmp_path / "out"
    # Without a pixel threshold: refused before anything is written, naming what is missing.
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(test), "--out", str(out), "--num-workers", "0",
                 "--no-progress", "--masks", "png"]) == 2
    assert "pixel threshold" in capsys.readouterr().err and not (out / "scores.csv").exists()
    cal = Calibration(image_threshold=1.0, score_min=0.0, score_max=2.0, method="f1", pixel_threshold=0.9,
                      map_min=0.0, map_max=2.0, num_normal=3, num_anomalous=2)
    write_calibration(ckpt, cal)
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(test), "--out", str(out), "--num-workers", "0",
                 "--no-progress", "--masks", "png", "--maps", "npy"]) == 0
    for r in _rows(out):
        name = os.path.basename(r["path"])
        amap = np.load(out / "maps" / f"{name}.npy")
        with Image.open(out / "masks" / f"{name}.png") as im:
            mask = np.asarray(im)
        assert set(np.unique(mask)) <= {0, 255}
        # The map is written normalised: 0.5 exactly where the raw map meets the pixel threshold.
        np.testing.assert_array_equal(mask == 255, amap >= 0.5)
        assert amap.min() >= 0.0 and amap.max() <= 1.0


def test_sensitivity_without_a_calibration_is_refused(ckpt, tmp_path, capsys):
    test = _pngs(tmp_path / "line", 2, 1)
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(test), "--out", str(tmp_path / "out"),
                 "--no-progress", "--sensitivity", "0.7"]) == 2
    assert "--sensitivity" in capsys.readouterr().err
