"""The demo at reduced sizes (a few seconds), the CLI's wiring of it, and the report's drawing."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ckaad_fast import report
from ckaad_fast.cli import main

EVAL_KEYS = {"image_auroc", "image_f1", "image_acc", "pixel_auroc", "aupro", "aupro_per_image",
             "num_images", "num_anomalous"}


pytestmark = pytest.mark.usefixtures("one_thread")


def test_tiny_demo_writes_a_report(tmp_path):
    from ckaad_fast.demo import run_demo

    out = tmp_path / "demo"
    res = run_demo(out, epochs=1, image_size=64, n_train=6, n_test_good=2, n_test_defect=1, n_coarse=2,
                   batch_size=4, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == EVAL_KEYS
    assert metrics["num_images"] == 6 and metrics["num_anomalous"] == 4
    for k in EVAL_KEYS - {"num_images", "num_anomalous"}:
        assert 0.0 <= metrics[k] <= 1.0
    assert res["metrics"] == metrics
    with Image.open(out / "grid.png") as im:
        # 6 columns of images, 3 rows (image, ground truth, map), plus labels and a colour bar.
        assert im.size[0] > 6 * 64 and im.size[1] > 3 * 64
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html  # self-contained
    assert "image_auroc" in html and "Training log" in html and "How CKAAD decides" in html
    assert (out / "train" / "checkpoint.pt").is_file()
    assert not list(out.glob(".*tmp"))


def test_cli_demo_passes_its_options(monkeypatch, tmp_path):
    import ckaad_fast.demo as demo

    got = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: got.update(out=out, **kw))
    assert main(["demo", "--out", str(tmp_path), "--epochs", "3", "--image-size", "96", "--category", "grass",
                 "--seed", "5", "--no-progress"]) == 0
    # No --device: the API's default applies (the CLI restates none).
    assert got == {"out": str(tmp_path), "epochs": 3, "image_size": 96, "category": "grass", "seed": 5,
                   "progress": False}
    got.clear()
    assert main(["demo", "--out", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    assert got["device"] == "cpu"


def test_demo_rejects_bad_arguments(tmp_path, capsys):
    from ckaad_fast.demo import run_demo

    with pytest.raises(ValueError, match="category"):
        run_demo(tmp_path, category="marble")
    with pytest.raises(ValueError, match="batch_size"):
        run_demo(tmp_path, n_train=4, batch_size=8)
    with pytest.raises(SystemExit):
        main(["demo", "--epochs", "0"])
    assert "--epochs" in capsys.readouterr().err


def test_turbo_colour_map_and_overlay():
    lut = report.turbo(np.array([0.15, 0.5, 0.95]))
    assert lut.dtype == np.uint8 and lut.shape == (3, 3)
    assert lut[0, 2] > 2 * lut[0, 0]  # low end is blue
    assert lut[2, 0] > 2 * lut[2, 2]  # high end is red
    amap = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    img = np.full((8, 8, 3), 200, np.uint8)  # resized to the map's size
    ov = report.overlay(img, amap, 0.0, 1.0, alpha=0.5)
    assert ov.shape == (16, 16, 3) and ov.dtype == np.uint8
    # Same scale for every image: a value maps to the same colour whatever the rest of its map.
    a = report.colorize(np.array([[0.3, 0.0]]), 0.0, 1.0)
    b = report.colorize(np.array([[0.3, 1.0]]), 0.0, 1.0)
    assert np.array_equal(a[0, 0], b[0, 0])
    # NaN and a degenerate range never crash.
    report.colorize(np.array([[np.nan, 1.0]]), 1.0, 1.0)
    lo, hi = report.colour_range([amap, amap * 2])
    assert lo < hi


def test_picture_grid_and_html(tmp_path):
    rng = np.random.default_rng(0)
    items = [
        {"image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "map": rng.random((32, 32)),
         "mask": (rng.random((32, 32)) > 0.8) if i else None, "label": "good" if i == 0 else "scratch",
         "score": float(i)}
        for i in range(3)
    ]
    grid = report.picture_grid(items, 0.0, 1.0, threshold=1.0, title="t")
    path = report.save_png(grid, tmp_path / "g.png")
    page = report.write_html_report(tmp_path / "r.html", title="<T>", metrics={"image_auroc": 0.9},
                                    grid_png=path, info={"a": [1, 2]},
                                    log=[{"epoch": 1, "g_loss": 1.0, "eval": {"image_auroc": 0.8}}])
    text = page.read_text()
    assert "&lt;T&gt;" in text and "0.9000" in text and "base64" in text and "0.8000" in text
    with pytest.raises(ValueError):
        report.picture_grid([], 0, 1)
