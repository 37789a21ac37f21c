"""A calibration set defends its contract, and odd images are refused everywhere alike.

- images labelled normal that score like defects are counted, named, and the threshold they moved
  is reported (the set's far-out fence); clean sets say nothing;
- the training split only by an explicit override, recorded in the calibration;
- an image far below the model's input size, or a float image with a NaN, is left out with a
  warning (calibrate, eval, train) or reported in its row (score), with the minimum stated.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
from PIL import Image

from ckaad_fast.calibration import (
    FENCE_IQRS,
    CalibrationSetWarning,
    calibration_from_scores,
    read_calibration,
    suspected_anomalies,
    threshold_at_fpr,
)
from ckaad_fast.cli import main
from ckaad_fast.data import MAX_UPSCALE, CorruptImageWarning, ImageRejected, decode_image, load_image
from ckaad_fast.data import minimum_source_size
from ckaad_fast.data.synthetic import make_texture_dataset
from ckaad_fast.evaluation import Predictions
from ckaad_fast.model import load_checkpoint

from helpers import read_rows, tiny_checkpoint, write_pngs  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 32


# -- anomalies among the normal images ------------------------------------------------------------
def _contaminated(seed=0):
    """Scores like the issue's: 100 normal images, 20 defects among them, 200 held-out defects."""
    rng = np.random.default_rng(seed)
    normal = rng.normal(1.2, 0.15, 100)
    defects = rng.normal(2.5, 0.3, 220)
    return normal, defects[:20], defects[20:]


def test_defects_among_normal_images_are_named_and_the_threshold_they_moved_is_reported():
    normal, mixed_in, held_out = _contaminated()
    scores = np.r_[normal, mixed_in]
    paths = [f"good/{i:03d}.png" for i in range(scores.size)]
    with pytest.warns(CalibrationSetWarning) as w:
        cal = calibration_from_scores(np.zeros(scores.size), scores, 0.05, paths=paths)
    msg = str(w[0].message)
    # Most of the 20 are caught (their low tail overlaps the fence, which they also raise), and
    # the warning names them and the threshold without them.
    assert 15 <= cal.suspected_anomalies <= 20
    assert f"{cal.suspected_anomalies} of 120" in msg and "good/100.png" in msg
    assert f"{cal.threshold_without_suspected:.6g}" in msg and f"{cal.image_threshold:.6g}" in msg
    # The threshold they set misses most held-out defects; the one without them catches them.
    clean = threshold_at_fpr(normal, 0.05)
    assert (held_out >= cal.image_threshold).mean() < 0.5
    assert (held_out >= cal.threshold_without_suspected).mean() > 0.95
    assert cal.threshold_without_suspected < normal.max() + 3 * normal.std() and clean <= normal.max()
    assert "scored like anomalies" in cal.describe()


def test_clean_sets_raise_no_warning():
    # Right-skewed normal scores (log-normal) are what a detector gives; a few land beyond the
    # fence, but unless they set the threshold the set is not called into question.
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationSetWarning)
        for seed in range(20):
            x = np.random.default_rng(seed).lognormal(0.0, 0.3, 300)
            cal = calibration_from_scores(np.zeros(x.size), x, 0.05)
            assert cal.threshold_without_suspected is None or cal.suspected_anomalies > 0


def test_the_fence_is_the_sets_own_quartiles():
    s = np.r_[np.arange(100, dtype=float), 1000.0]
    mask, fence = suspected_anomalies(s)
    q1, q3 = np.percentile(s, [25, 75])
    assert fence == pytest.approx(q3 + FENCE_IQRS * (q3 - q1)) and mask.sum() == 1 and mask[-1]


def test_the_cli_names_suspects_and_records_them(tmp_path, capsys, monkeypatch):
    import ckaad_fast.calibration.run as calibration  # where calibrate() scores

    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", SIZE)
    folder = write_pngs(tmp_path / "good", 120, 0, SIZE)
    normal, mixed_in, _ = _contaminated()
    by_name = dict(zip(sorted(os.listdir(folder)), np.r_[normal, mixed_in]))

    def scores_by_name(model, dataset, **kw):  # the model is tested elsewhere: these are the set's scores
        paths = [dataset[i][2] for i in range(len(dataset))]
        s = np.array([by_name[os.path.basename(p)] for p in paths], dtype=np.float32)
        return Predictions(s, np.zeros(len(s), dtype=np.int64), np.zeros((len(s), 2, 2), np.float32), None, paths)

    monkeypatch.setattr(calibration, "predict_dataset", scores_by_name)
    with pytest.warns(CalibrationSetWarning) as w:
        assert main(["calibrate", "--checkpoint", str(ckpt), "--normal", str(folder), "--target-fpr", "0.05",
                     "--quiet"]) == 0
    assert len(w) == 1 and "100.png" in str(w[0].message) and "without them it would be" in str(w[0].message)
    cal = read_calibration(load_checkpoint(ckpt))
    assert cal.suspected_anomalies >= 15 and "scored like anomalies" in capsys.readouterr().out


# -- the training split, only by an explicit override -----------------------------------------------
def test_the_training_split_needs_an_override_that_is_recorded(tmp_path, capsys):
    root = make_texture_dataset(tmp_path / "data", "gravel", n_train=10, n_test_good=1, n_test_defect=1,
                                n_coarse=0, image_size=SIZE, seed=0)
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", SIZE)
    base = ["calibrate", "--checkpoint", str(ckpt), "--data", str(root), "--category", "gravel", "--split", "train",
            "--target-fpr", "0.1", "--quiet"]
    assert main(base) == 2
    assert "--allow-training-images" in capsys.readouterr().err
    assert read_calibration(load_checkpoint(ckpt)) is None
    assert main(base + ["--allow-training-images"]) == 0
    assert "training images (explicit override)" in capsys.readouterr().out
    cal = read_calibration(load_checkpoint(ckpt))
    assert cal.on_training_images and cal.num_normal == 10
    # The override means nothing elsewhere: refused rather than ignored.
    assert main(["calibrate", "--checkpoint", str(ckpt), "--normal", str(root / "gravel" / "train" / "good"),
                 "--allow-training-images", "--quiet"]) == 2
    assert "--allow-training-images" in capsys.readouterr().err


# -- odd images, everywhere alike ---------------------------------------------------------------------
def _odd_images(folder):
    """A 1x1 PNG, an image just below the minimum, one at it, and a float TIFF holding a NaN."""
    folder.mkdir(parents=True, exist_ok=True)
    min_h, min_w = minimum_source_size(SIZE)
    Image.new("RGB", (1, 1), (200, 10, 10)).save(folder / "tiny.png")
    Image.new("RGB", (min_w - 1, min_h), (9, 9, 9)).save(folder / "narrow.png")
    Image.new("RGB", (min_w, min_h), (9, 9, 9)).save(folder / "smallest.png")
    arr = np.random.default_rng(0).random((SIZE, SIZE)).astype(np.float32)
    arr[1, 2] = np.nan
    Image.fromarray(arr, mode="F").save(folder / "scan.tif")


def test_the_minimum_is_one_eighth_of_the_input_and_both_readers_agree(tmp_path):
    assert MAX_UPSCALE == 8 and minimum_source_size(256) == (32, 32) and minimum_source_size((100, 17)) == (13, 3)
    _odd_images(tmp_path)
    for name, words in (("tiny.png", "1x1 pixels"), ("narrow.png", "at least 4x4"), ("scan.tif", "non-finite")):
        for read in (lambda p: load_image(p, SIZE), lambda p: decode_image(p, SIZE)):
            with pytest.raises(ImageRejected, match=words):
                read(tmp_path / name)
    assert load_image(tmp_path / "smallest.png", SIZE).shape == (3, SIZE, SIZE)


def test_score_reports_odd_images_in_their_rows(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", SIZE)
    folder = write_pngs(tmp_path / "in", 2, 0, SIZE)
    _odd_images(folder)
    out = tmp_path / "out"
    assert main(["score", "--checkpoint", str(ckpt), "--input", str(folder), "--out", str(out), "--num-workers", "0",
                 "--no-progress"]) == 1  # finished; some images could not be scored
    rows = {os.path.basename(r["path"]): r for r in read_rows(out)}
    assert "1x1 pixels" in rows["tiny.png"]["error"] and "at least 4x4" in rows["tiny.png"]["error"]
    assert "at least 4x4" in rows["narrow.png"]["error"] and "non-finite" in rows["scan.tif"]["error"]
    assert all(rows[n]["score"] == "" for n in ("tiny.png", "narrow.png", "scan.tif"))
    assert rows["smallest.png"]["error"] == "" and math.isfinite(float(rows["smallest.png"]["score"]))


def test_calibrate_leaves_odd_images_out_with_a_warning_each(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", SIZE)
    folder = write_pngs(tmp_path / "good", 10, 0, SIZE)
    _odd_images(folder)
    # In a process of its own, to see the warnings as a user does: one line each, named.
    run = subprocess.run([sys.executable, "-m", "ckaad_fast", "calibrate", "--checkpoint", str(ckpt), "--normal",
                          str(folder), "--target-fpr", "0.1", "--quiet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = [x for x in run.stderr.splitlines() if "skipping image" in x]
    assert len(lines) == 3 and all(x.startswith("ckaad-fast calibrate: warning: skipping image '") for x in lines)
    for name, words in (("tiny.png", "at least 4x4"), ("narrow.png", "at least 4x4"), ("scan.tif", "non-finite")):
        assert any(f"'{folder / name}'" in x and words in x for x in lines)
    assert read_calibration(load_checkpoint(ckpt)).num_normal == 11  # 10 + the smallest acceptable one


def test_eval_and_train_leave_odd_images_out(tmp_path):
    root = make_texture_dataset(tmp_path / "data", "gravel", n_train=4, n_test_good=2, n_test_defect=1,
                                n_coarse=0, image_size=SIZE, seed=0)
    for split in ("train/good", "test/good"):
        d = root / "gravel" / split
        Image.new("RGB", (1, 1)).save(d / "tiny.png")
        arr = np.full((SIZE, SIZE), np.nan, dtype=np.float32)
        Image.fromarray(arr, mode="F").save(d / "nan.tif")
    out = tmp_path / "run"
    with pytest.warns(CorruptImageWarning) as w:
        assert main(["train", "--data", str(root), "--category", "gravel", "--backbone", "efficientnet_lite0",
                     "--layers", "1", "2", "--weights", "none", "--image-size", str(SIZE), "--epochs", "1",
                     "--batch-size", "2", "--strategy", "recon", "--out", str(out), "--quiet"]) == 0
    assert {os.path.basename(str(x.message).split("'")[1]) for x in w} >= {"tiny.png", "nan.tif"}
    assert load_checkpoint(out)["history"][-1]["steps"] == 2  # the 4 good images, batch 2
    with pytest.warns(CorruptImageWarning):
        assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), "--data", str(root), "--category", "gravel",
                     "--json", str(tmp_path / "m.json"), "--quiet"]) == 0
    test_files = [f for _, _, fs in os.walk(root / "gravel" / "test") for f in fs]
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == len(test_files) - 2  # not the odd two


def test_suspects_that_do_not_move_the_threshold_raise_no_warning():
    # The demo's case: a normal image scores beyond the fence, but the anomalies of the set pick
    # the threshold by F1, the same with or without it: nothing to warn about.
    rng = np.random.default_rng(0)
    normal = np.r_[rng.normal(1.2, 0.05, 29), 1.70]
    anomalous = np.array([1.80, 2.20])
    labels = np.r_[np.zeros(normal.size), np.ones(anomalous.size)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", CalibrationSetWarning)
        cal = calibration_from_scores(labels, np.r_[normal, anomalous], 0.01)
    assert cal.suspected_anomalies == 1 and cal.threshold_without_suspected == cal.image_threshold
    # The same suspect moving a normal-only threshold is warned about.
    with pytest.warns(CalibrationSetWarning):
        calibration_from_scores(np.zeros(normal.size + 1), np.r_[normal, 2.5], 0.05)


def test_writing_a_checkpoint_removes_its_killed_writes_temporaries(tmp_path):
    import time

    from ckaad_fast.atomic import atomic_torch_save

    target = tmp_path / "model.pt"
    old, young, other = (tmp_path / ".model.pt.abcd1234.tmp", tmp_path / ".model.pt.efgh5678.tmp",
                         tmp_path / ".other.pt.ijkl9012.tmp")
    for p in (old, young, other):
        p.write_bytes(b"partial")
    past = time.time() - 7200
    for p in (old, other):
        os.utime(p, (past, past))
    atomic_torch_save({"x": 1}, target)
    assert target.is_file() and not old.exists()
    assert young.exists() and other.exists()  # a write in progress, and another file's


def _demo_like(rng, n_normal=100, per_type=5):
    """Scores shaped like the demo model's on fresh images of its generator (2026-12-07: normal
    median 1.21 with interquartile range 0.27; defect medians 2.17 hole, 2.13 patch, 1.86 scratch,
    1.74 stain): normal ones, and defects of four types whose lower tails overlap the normal tail."""
    normal = rng.normal(1.21, 0.2, n_normal)
    defects = np.concatenate([rng.normal(m, sd, per_type) for m, sd in
                              ((2.17, 0.2), (2.13, 0.28), (1.86, 0.16), (1.74, 0.23))])
    return normal, defects


def test_a_fifth_of_defects_is_caught_where_the_fence_alone_named_one():
    # The round-3 case: 20 defects given as normal among 100. The far-out fence, raised by them,
    # names few; the contamination test finds the excess of high scores and names most of them.
    caught, fence_alone, quiet = [], [], 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        normal, defects = _demo_like(rng)
        s = np.r_[normal, defects]
        mask, _ = suspected_anomalies(s)
        caught.append(int(mask[100:].sum()))
        q1, q3 = np.percentile(s, [25, 75])
        fence_alone.append(int((defects > q3 + FENCE_IQRS * (q3 - q1)).sum()))
        quiet += int(mask[:100].sum() <= 2)
    caught = np.array(caught)
    assert np.median(fence_alone) <= 5  # what the fence alone did
    # 68% of these draws name at least 15 (83% on the real scores, where the test fired in 87%);
    # without the contamination test the median is the fence's, a few.
    assert np.mean(caught >= 15) >= 0.6 and np.median(caught) >= 15
    assert quiet >= 55  # and few normal images named with them


def test_clean_sets_of_several_shapes_are_rarely_called_contaminated():
    # The test's false alarms on clean sets (measured in ckaad_fast.calibration_checks' docstring):
    # at most a few percent even for long right tails, none of 200 near-normal sets here.
    shapes = {"demo-like": lambda r: r.normal(1.21, 0.2, 100), "log-normal 0.3": lambda r: r.lognormal(0, 0.3, 300),
              "log-normal 0.5": lambda r: r.lognormal(0, 0.5, 100), "gamma 2": lambda r: r.gamma(2.0, 1.0, 100)}
    rates = {}
    for name, draw in shapes.items():
        alarms = 0
        for seed in range(200):
            s = draw(np.random.default_rng(10_000 + seed))
            mask, fence = suspected_anomalies(s)
            q1, q3 = np.percentile(s, [25, 75])
            alarms += int(fence < q3 + FENCE_IQRS * (q3 - q1))  # the contamination test fired
        rates[name] = alarms / 200
    assert rates["demo-like"] <= 0.01 and max(rates.values()) <= 0.05, rates
