"""Defect regions: connected components of a map at the pixel threshold, the threshold picked at a
pixel false-positive rate where a calibration set has no masks, and score's regions output."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ckaad_fast.calibration import calibration_from_scores
from ckaad_fast.calibration.thresholds import pixel_threshold_at_fpr
from ckaad_fast.errors import ArgumentError
from ckaad_fast.evaluation import predict_dataset
from ckaad_fast.regions import Region, draw_boxes, find_regions, regions_from_text, regions_to_text

from helpers import tiny_checkpoint, write_pngs

pytestmark = pytest.mark.filterwarnings("ignore:.*random weights")


def _two_defects():
    amap = np.zeros((40, 60), dtype=np.float32)
    amap[5:9, 10:13] = 0.8          # 4 x 3 = 12 pixels
    amap[7, 11] = 0.95
    amap[20:30, 40:45] = 0.6        # 10 x 5 = 50 pixels
    amap[30, 45] = 0.7              # touches the second one diagonally: the same region
    return amap


def test_two_separate_defects_give_two_regions():
    regions = find_regions(_two_defects(), 0.5)
    assert regions == [
        Region(x0=10, y0=5, x1=13, y1=9, area=12, peak=pytest.approx(0.95), mean=pytest.approx((11 * 0.8 + 0.95) / 12)),
        Region(x0=40, y0=20, x1=46, y1=31, area=51, peak=pytest.approx(0.7), mean=pytest.approx((50 * 0.6 + 0.7) / 51)),
    ]
    assert [r.area for r in find_regions(_two_defects(), 0.65)] == [12, 1]  # only the 0.7 pixel of the second
    assert find_regions(_two_defects(), 1.0) == []


def test_regions_leave_out_non_finite_values_and_round_trip():
    amap = _two_defects()
    amap[0, 0] = np.nan
    amap[39, 59] = np.inf
    regions = find_regions(amap, 0.5)
    assert len(regions) == 2
    assert regions_from_text(regions_to_text(regions)) == regions
    assert regions_from_text("") == []
    with pytest.raises(ValueError, match=r"amap must be \(H, W\)"):
        find_regions(np.zeros((2, 3, 4)), 0.5)


def test_boxes_are_drawn_on_the_picture():
    picture = np.zeros((40, 60, 3), dtype=np.uint8)
    boxed = draw_boxes(picture, find_regions(_two_defects(), 0.5))
    assert (boxed[5, 10:13] == 255).all() and (boxed[8, 10:13] == 255).all() and (boxed[5:9, 12] == 255).all()
    assert boxed[6, 11].sum() == 0 and picture.sum() == 0  # inside stays; the input is not drawn on


def test_pixel_threshold_at_a_false_positive_rate():
    rng = np.random.default_rng(0)
    pixels = rng.normal(size=100_000).astype(np.float32)
    top = np.sort(pixels)[::-1][:12]
    t = pixel_threshold_at_fpr(top, pixels.size, 1e-4)
    assert (pixels >= t).sum() <= 10 and (pixels >= np.nextafter(np.float32(top[10]), np.float32(-np.inf))).sum() > 10
    assert t == np.float32(t)
    with pytest.raises(ValueError, match="cannot place a threshold"):
        pixel_threshold_at_fpr(top[:5], pixels.size, 1e-4)
    with pytest.raises(ArgumentError, match="pixel_fpr"):
        pixel_threshold_at_fpr(top, pixels.size, 0)


def test_predict_dataset_keeps_the_normal_maps_largest_values(tmp_path):
    from ckaad_fast.model import model_from_checkpoint

    model = model_from_checkpoint(tiny_checkpoint(tmp_path / "tiny.pt", 32))
    rng = np.random.default_rng(1)
    data = [(torch.from_numpy(rng.standard_normal((3, 32, 32)).astype(np.float32)), i % 3 == 0, f"{i}.png")
            for i in range(9)]
    kept = predict_dataset(model, data, batch_size=4, progress=False, keep_maps=True, normal_top_share=0.01)
    normal = kept.maps[kept.labels == 0].reshape(-1)
    assert kept.normal_pixels == normal.size
    expected = np.sort(normal)[::-1][:kept.normal_top.size]
    np.testing.assert_array_equal(kept.normal_top, expected)
    assert kept.normal_top.size >= 0.01 * normal.size + 1


def test_score_writes_regions_and_draws_them(tmp_path):
    from PIL import Image

    from ckaad_fast.model import model_from_checkpoint
    from ckaad_fast.scoring import Scorer, score_to_folder

    ckpt = tiny_checkpoint(tmp_path / "tiny.pt", 32)
    model = model_from_checkpoint(ckpt)
    folder = write_pngs(tmp_path / "in", 12, seed=4, size=32)
    scorer = Scorer(model, device="cpu", dtype="float32", engine="torch")
    maps = {r.path: r.map for r in scorer.score_folder(folder)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = calibration_from_scores(np.zeros(12), [float(m.max()) for m in maps.values()], 0.1,
                                      precision="float32", device="cpu", engine="torch")
    cal.pixel_threshold = float(np.quantile(np.stack(list(maps.values())), 0.99))
    scorer = Scorer(model, device="cpu", calibration=cal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the promise monitor may speak: this set is no normal one
        score_to_folder(scorer, sorted(maps), tmp_path / "out", maps="png", progress=False)
    written = json.loads((tmp_path / "out" / "regions.json").read_text())
    assert written["pixel_threshold"] == cal.pixel_threshold and len(written["images"]) == 12
    for image in written["images"]:
        expected = find_regions(maps[image["path"]], cal.pixel_threshold)
        assert [Region(**r) for r in image["regions"]] == expected
    assert sum(len(i["regions"]) for i in written["images"]) > 0
    # Off: no column, no file; and a resume refuses the change.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        score_to_folder(scorer, sorted(maps), tmp_path / "off", maps="png", regions=False, progress=False)
    assert not (tmp_path / "off" / "regions.json").exists()
    with pytest.raises(ArgumentError, match="regions"):
        score_to_folder(scorer, sorted(maps), tmp_path / "off", regions=True, resume=True, progress=False)
    # The overlays of images with regions show their boxes: white outlines the plain overlay lacks.
    boxed = [i for i in written["images"] if i["regions"]]
    for image in boxed:
        name = (tmp_path / "out" / "maps").rglob(Path(image["path"]).name + ".png")
        on = np.asarray(Image.open(next(name)))
        off = np.asarray(Image.open(next((tmp_path / "off" / "maps").rglob(Path(image["path"]).name + ".png"))))
        r = Region(**image["regions"][0])
        assert (on[r.y0, r.x0:r.x1] == 255).all() and not np.array_equal(on, off)
    # Without a pixel threshold, regions are refused by name.
    cal.pixel_threshold = None
    with pytest.raises(ValueError, match="regions need a checkpoint calibrated with a pixel threshold"):
        score_to_folder(Scorer(model, device="cpu", calibration=cal), sorted(maps), tmp_path / "x", regions=True)
