"""Tiling: the grid, the blend weights, the stitching, the seams, the tiled forward of every path,
training on tiles, the checkpoint's record, and the options' errors."""
from __future__ import annotations

import csv
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from ckaad_fast.cli import main
from ckaad_fast.errors import ArgumentError
from ckaad_fast.evaluation import predict_dataset
from ckaad_fast.model import Detector, ModelConfig, load_checkpoint, model_from_checkpoint
from ckaad_fast.scoring import Scorer
from ckaad_fast.tiling import Stitcher, Tiling, axis_starts, axis_weights, seam_ratio, tiling_of

pytestmark = pytest.mark.usefixtures("one_thread")
F32_EPS = float(np.finfo(np.float32).eps)


def _model(tile=64, stride=48, size=64, seed=0, state=None):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = Detector(ModelConfig(backbone="resnet18", layers=(2, 3), image_size=(size, size), topk=50,
                                 tile_size=tile, tile_stride=stride), weights="none").eval()
    if state is not None:
        m.load_state_dict(state)
    return m


# ------------------------------------------------------------------------------------------------
# The grid and the weights
# ------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_stitching_is_exact_where_tiles_do_not_overlap(size, rows, cols, seed):
    tiling = Tiling(size, size)
    h, w = rows * size, cols * size
    maps = torch.from_numpy(np.random.default_rng(seed).standard_normal((rows * cols, size, size)).astype(np.float32))
    corners = tiling.grid(h, w)
    st_ = Stitcher(h, w, tiling)
    st_.add(maps, corners)
    for m, (y, x) in zip(maps, corners):
        assert torch.equal(st_.map[y:y + size, x:x + size], m)  # bit for bit


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_blend_weights_sum_to_one(data):
    length = data.draw(st.integers(1, 300))
    size = data.draw(st.integers(1, length))
    stride = data.draw(st.integers(1, size))
    starts, weights = axis_weights(length, size, stride)
    assert starts[0] == 0 and starts[-1] == length - size and starts == sorted(set(starts))
    total = np.zeros(length)
    covers = np.zeros(length, int)
    for s, wgt in zip(starts, weights):
        total[s:s + size] += wgt.astype(np.float64)
        covers[s:s + size] += 1
    assert (covers >= 1).all()  # every pixel is scored
    # Each float32 weight is the float64 ratio rounded once (half an ulp of 1 at most); at most
    # ceil(size / stride) + 1 tiles cover a pixel.
    n = -(-size // stride) + 1
    assert np.abs(total - 1).max() <= n * F32_EPS / 2
    assert (total[covers == 1] == 1.0).all()  # one tile: weight exactly 1


def test_two_dimensional_weights_sum_to_one_and_seamless_ones():
    tiling = Tiling(48, 37)
    h, w = 181, 130
    st_ = Stitcher(h, w, tiling)
    corners = tiling.grid(h, w)
    st_.add(torch.ones(len(corners), 48, 48), corners)
    # A product of two axis weights (each within n eps/2 of a sum of one) and float32 sums of <= 4 terms.
    assert (st_.map - 1).abs().max().item() <= 8 * F32_EPS


@pytest.mark.parametrize("make, name, words", [
    (lambda: Tiling(64, 0), "tile_stride", "never move"),
    (lambda: Tiling(64, 65), "tile_stride", "larger than the tile size"),
    (lambda: Tiling(0, 1), "tile_size", ">= 1"),
    (lambda: tiling_of(None, 8), "tile_stride", "needs a tile size"),
    (lambda: Tiling(64, 32).grid(40, 300), "tile_size", "larger than the image (300x40"),
    (lambda: axis_starts(10, 11, 1), "tile_size", "larger than the image side"),
    (lambda: ModelConfig(backbone="resnet18", image_size=(64, 32), tile_size=16), "tile_size", "square"),
    # Tiles enlarged more than data.MAX_UPSCALE times (a checkpoint edited to tile size 1 too).
    (lambda: ModelConfig(backbone="resnet18", image_size=(64, 64), tile_size=4), "tile_size", "enlarged 16x"),
    (lambda: ModelConfig(backbone="resnet18", image_size=(64, 64), tile_size=1), "tile_size", "at most 8x"),
])
def test_bad_tile_options_are_one_line_errors(make, name, words):
    with pytest.raises(ArgumentError) as e:
        make()
    assert e.value.name == name and words in e.value.message and "\n" not in str(e.value)


def test_default_stride_overlaps_by_a_quarter():
    assert tiling_of(256) == Tiling(256, 192) and tiling_of(3) == Tiling(3, 3)
    assert ModelConfig(backbone="resnet18", tile_size=128).tile_stride == 96


# ------------------------------------------------------------------------------------------------
# Seams and the tiled forward
# ------------------------------------------------------------------------------------------------
def _texture(h, w, seed=0):
    """A smooth random texture in [0, 1] (a normal image has no edges for a seam to hide behind)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 3, h // 8 + 1, w // 8 + 1, generator=g)
    return torch.nn.functional.interpolate(x, size=(h, w), mode="bilinear", align_corners=True)


def test_a_normal_maps_seams_stay_below_the_bound():
    # With the blend the map crosses a tile's edge as smoothly as it varies inside a tile (bound
    # 1.5: a tile's edge weighs 0.5/overlap of the tiles' disagreement there); without overlap
    # each tile's border (its padding and blur) makes a step the same statistic sees at once.
    blended = _model(64, 48)
    plain = _model(64, 64, state=blended.state_dict())
    x = (_texture(256, 256) - 0.45) / 0.25
    with torch.inference_mode():
        _, m_blend = blended.tiled(x, batch=16)
        _, m_plain = plain.tiled(x, batch=16)
    r_blend = seam_ratio(m_blend[0].numpy(), blended.config.tiling)
    r_plain = seam_ratio(m_plain[0].numpy(), plain.config.tiling)
    assert r_blend <= 1.5, r_blend
    assert r_plain > 3.0, r_plain  # the check can see a seam


def test_scorer_and_predict_dataset_tile_as_the_model_does(tmp_path):
    model = _model(64, 40)
    rng = np.random.default_rng(1)
    files = []
    for i, (h, w) in enumerate([(150, 97), (150, 97)]):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(p)
        files.append(str(p))
    scorer = Scorer(model, dtype="float32", engine="torch", batch_size=5, num_workers=0)
    results = list(scorer.score_paths(files))
    from ckaad_fast.data import load_image

    x = torch.stack([load_image(f, None, model.config.mean, model.config.std) for f in files])
    with torch.inference_mode():
        s, m = model.tiled(x, batch=5)
    s2, m2 = scorer(x)
    assert torch.equal(s, s2) and torch.equal(m, m2)
    for r, si, mi in zip(results, s, m):
        assert r.map.shape == (150, 97)  # the image's own resolution
        assert r.score == pytest.approx(float(si), rel=1e-5) and np.allclose(r.map, mi.numpy(), atol=1e-5)

    from ckaad_fast.data import FolderDataset

    root = tmp_path / "set"
    for cls, f in (("good", files[0]), ("bad", files[1])):
        (root / "test" / cls).mkdir(parents=True)
        Image.open(f).save(root / "test" / cls / "0.png")
    ds = FolderDataset(root, normal_class="good", split="test", image_size=None, mean=model.config.mean,
                       std=model.config.std)
    pred = predict_dataset(model, ds, batch_size=5, progress=False)
    assert pred.maps.shape == (2, 150, 97)
    order = [ds.paths.index(str(root / "test" / c / "0.png")) for c in ("good", "bad")]
    assert np.array_equal(pred.scores[order], s.numpy())


def test_tile_size_other_than_the_input_is_resized_both_ways():
    model = _model(tile=96, stride=80, size=64)
    with torch.inference_mode():
        s, m = model.tiled(torch.randn(1, 3, 200, 176), batch=4)
    assert m.shape == (1, 200, 176) and torch.isfinite(s).all()


# ------------------------------------------------------------------------------------------------
# Training on tiles, the checkpoint's record, the CLI
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def highres(tmp_path_factory):
    from ckaad_fast.data.highres import make_highres_dataset

    return make_highres_dataset(tmp_path_factory.mktemp("hr"), "grass", image_size=192, scale=1, n_train=3,
                                n_test_good=2, n_test_defect=2, defect_px=(6, 6))


def test_train_records_the_tiling_and_score_follows_it(highres, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--layout", "mvtec", "--data", str(highres), "--category", "grass", "--strategy", "recon",
                 "--backbone", "resnet18", "--layers", "2", "3", "--weights", "none", "--image-size", "64",
                 "--tile-size", "64", "--tile-stride", "48", "--memory-norm-cell", "16", "--epochs", "1",
                 "--batch-size", "8", "--out", str(out), "--quiet"]) == 0
    ckpt = load_checkpoint(out)
    assert ckpt["config"]["tile_size"] == 64 and ckpt["config"]["tile_stride"] == 48
    assert ckpt["train_config"]["tile_size"] == 64 and ckpt["train_config"]["tile_stride"] == 48  # a resume keeps it
    # A tiled run decides by its feature memory (#36): the training images' features, one row per
    # cell of resnet18 layer 3's grid (stride 16) of each 192² image at scale 1.
    assert ckpt["config"]["memory_candidates"] == 500 and ckpt["config"]["memory_norm_cell"] == 16
    assert ckpt["model"]["memory_norm_mean"].shape == (12, 12)  # 16 px cells of a 192² map
    assert ckpt["model"]["memory_vectors"].shape == (3 * 12 * 12, 128 + 256)
    test_dir = highres / "grass" / "test" / "spot"
    assert main(["score", "--checkpoint", str(out), "--input", str(test_dir), "--out", str(tmp_path / "s"),
                 "--num-workers", "0", "--no-progress", "--engine", "torch", "--dtype", "float32"]) == 0
    with open(tmp_path / "s" / "scores.csv", newline="") as f:
        rows = {r["path"]: float(r["score"]) for r in csv.DictReader(f)}
    model = model_from_checkpoint(out)
    from ckaad_fast.data import load_image

    for path, value in rows.items():
        x = load_image(path, None, model.config.mean, model.config.std)[None]
        with torch.inference_mode():
            s, m = model.tiled(x, batch=16)
        assert m.shape[-2:] == (192, 192)
        assert value == pytest.approx(float(s), rel=1e-5)
    capsys.readouterr()
    # The options restate the record or are refused, naming the option, on one line.
    for cmd, extra in (("score", ["--input", str(test_dir), "--out", str(tmp_path / "s2")]),
                       ("eval", ["--layout", "mvtec", "--data", str(highres), "--category", "grass"]),
                       ("export", ["--out", str(tmp_path / "e")])):
        assert main([cmd, "--checkpoint", str(out), *extra, "--tile-size", "32"]) == 2
        err = capsys.readouterr().err
        assert "--tile-size" in err and "checkpoint's tiling" in err and err.strip().count("\n") == 0
    # The exported graph scores tiles and cannot carry the memory: refused, naming the way out.
    assert main(["export", "--checkpoint", str(out), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "feature memory" in err and "--memory-candidates 0" in err and err.strip().count("\n") == 0


def test_train_refuses_a_tile_larger_than_the_images(highres, tmp_path, capsys):
    assert main(["train", "--layout", "mvtec", "--data", str(highres), "--category", "grass", "--strategy", "recon",
                 "--backbone", "resnet18", "--layers", "2", "3", "--weights", "none", "--image-size", "64",
                 "--tile-size", "256", "--epochs", "1", "--batch-size", "2", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--tile-size" in err and "larger than" in err and err.strip().count("\n") == 0
    assert main(["train", "--layout", "mvtec", "--data", str(highres), "--category", "grass",
                 "--tile-size", "64", "--tile-stride", "80", "--out", str(tmp_path / "r2")]) == 2
    err = capsys.readouterr().err
    assert "--tile-stride" in err and err.strip().count("\n") == 0


@pytest.mark.slow
def test_a_six_pixel_defect_is_in_the_top_percent_of_a_tiled_512_map(tmp_path):
    # Trained on tiles of normal 512² texture images (64² tiles at a 64² input); a 6-pixel spot
    # is a 36-pixel blob in a map of 262,144 pixels: among its top 1% (2,621 values).
    from ckaad_fast.data import MVTecDataset
    from ckaad_fast.data.highres import add_small_defect, make_highres_dataset, render_highres_normal
    from ckaad_fast.data.synthetic import load_texture
    from ckaad_fast.training import TrainConfig, train

    root = make_highres_dataset(tmp_path / "d", "brick", image_size=512, scale=2, n_train=3, n_test_good=1,
                                n_test_defect=1)
    cfg = TrainConfig(strategy="recon", backbone="efficientnet_lite0", layers=(1, 2, 3), image_size=64, epochs=12,
                      batch_size=16, seed=0, tile_size=64, tile_stride=48)
    mean, std = cfg.normalization()
    result = train(cfg, MVTecDataset(root, "brick", "train", None, mean, std), out_dir=tmp_path / "run", progress=False)
    rng = np.random.default_rng(0)
    img, mask = add_small_defect(render_highres_normal(load_texture("brick"), rng, 512, 2, "brick"), rng, (6, 6))
    x = torch.from_numpy(img.round().astype(np.float32) / 255).permute(2, 0, 1)[None]
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    model = result.model.eval()
    with torch.inference_mode():
        _, m = model.tiled(x.float(), batch=32)
    m = m[0].numpy()
    assert m.shape == (512, 512)
    top = np.quantile(m, 0.99)
    assert m[mask].max() >= top, (m[mask].max(), top)


def test_an_image_smaller_than_a_tile_is_an_error_row_in_score_and_left_out_elsewhere(tmp_path):
    # One small file among full-size ones: the Scorer reports it in its row and scores the others;
    # predict_dataset (eval, calibrate) and the tile loader (train) leave it out with a warning.
    from ckaad_fast.data import CorruptImageWarning, FolderDataset
    from ckaad_fast.training.loaders import TileImages

    model = _model(64, 48)
    rng = np.random.default_rng(2)
    root = tmp_path / "set"
    sizes = {"good/0.png": (150, 97), "good/1.png": (40, 300), "bad/0.png": (150, 97), "bad/1.png": (5, 5)}
    for name, (h, w) in sizes.items():
        (root / "test" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "test" / name)
    files = sorted(str(p) for p in (root / "test").rglob("*.png"))
    scorer = Scorer(model, dtype="float32", engine="torch", batch_size=5, num_workers=0)
    results = {r.path: r for r in scorer.score_paths(files)}
    for name, (h, w) in sizes.items():
        r = results[str(root / "test" / name)]
        if min(h, w) < 64:
            assert not r.ok and "smaller than the model's 64x64 tiles" in r.error and f"{w}x{h}" in r.error
        else:
            assert r.ok and r.map.shape == (h, w)
    ds = FolderDataset(root, normal_class="good", split="test", image_size=None, mean=model.config.mean,
                       std=model.config.std)
    with pytest.warns(CorruptImageWarning, match="smaller than the model's 64x64 tiles"):
        pred = predict_dataset(model, ds, batch_size=5, progress=False)
    assert sorted(pred.paths) == sorted(str(root / "test" / n) for n in ("good/0.png", "bad/0.png"))
    with pytest.warns(CorruptImageWarning, match="smaller than"):
        tiles = TileImages(ds, model.config.tiling, (64, 64))
    assert {i for i, _, _ in tiles.index} == {ds.paths.index(str(root / "test" / n)) for n in ("good/0.png", "bad/0.png")}


def test_score_of_a_tiled_model_goes_on_past_a_small_image_and_resumes(tmp_path, capsys):
    from ckaad_fast.model import save_checkpoint

    model = _model(64, 48)
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, model)
    rng = np.random.default_rng(3)
    folder = tmp_path / "in"
    folder.mkdir()
    for i, (h, w) in enumerate([(100, 100), (70, 80), (100, 5), (90, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "out"
    args = ["score", "--checkpoint", str(ckpt), "--input", str(folder), "--out", str(out), "--num-workers", "0",
            "--no-progress", "--engine", "torch", "--dtype", "float32", "--batch-size", "2"]
    assert main(args) == 1  # score's status when a file could not be scored (its row says why)
    with open(out / "scores.csv", newline="") as f:
        rows = {os.path.basename(r["path"]): r for r in csv.DictReader(f)}
    assert len(rows) == 4 and "smaller than" in rows["2.png"]["error"] and rows["0.png"]["score"]
    assert main(args + ["--resume"]) in (0, 1)  # no stop at the small file
    with open(out / "scores.csv", newline="") as f:
        assert len(list(csv.DictReader(f))) == 4
    capsys.readouterr()


def test_a_tiled_calibration_refuses_mixed_sizes_and_int8_before_scoring(tmp_path, monkeypatch):
    import ckaad_fast.calibration.run as calibration  # where calibrate() scores
    from ckaad_fast.calibration import normal_folder_set
    from ckaad_fast.errors import ArgumentError

    model = _model(64, 48)
    rng = np.random.default_rng(4)
    folder = tmp_path / "good"
    folder.mkdir()
    for i, (h, w) in enumerate([(100, 100)] * 20 + [(120, 90)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    data = normal_folder_set(folder, None, model.config.mean, model.config.std)

    def never(*a, **k):
        raise AssertionError("scored before the set was checked")

    monkeypatch.setattr(calibration, "predict_dataset", never)
    with pytest.raises(ArgumentError, match="data: the calibration set.s images come in more than one size"):
        calibration.calibrate(model, data, target_fpr=0.1, engine="torch")
    with pytest.raises(ArgumentError, match="precision: int8 is not available for a tiled model"):
        calibration.calibrate(model, data, target_fpr=0.1, precision="int8", engine="openvino")


def test_a_calibration_set_of_normal_images_keeps_only_each_maps_range(tmp_path):
    # Memory that does not grow with the images times their pixels: a set without masks keeps
    # each map's (min, max); the calibration's map range is the same as from the whole maps.
    import ckaad_fast.calibration as calibration

    model = _model(64, 48)
    rng = np.random.default_rng(5)
    folder = tmp_path / "good"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (150, 97, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    data = calibration.normal_folder_set(folder, None, model.config.mean, model.config.std)
    full = predict_dataset(model, data, batch_size=8, progress=False)
    lean = predict_dataset(model, data, batch_size=8, progress=False, keep_maps="masked")
    assert lean.maps is None and lean.map_range.shape == (12, 2)
    np.testing.assert_array_equal(lean.map_range, np.stack([full.maps.min((1, 2)), full.maps.max((1, 2))], 1))
    np.testing.assert_array_equal(lean.scores, full.scores)
    cal = calibration.calibrate(model, data, target_fpr=0.1, engine="torch", batch_size=8)
    assert (cal.map_min, cal.map_max) == (float(full.maps.min()), float(full.maps.max()))


def test_the_plate_is_one_aligned_part_and_calibration_normals_leave_the_other_images_alone(tmp_path):
    from PIL import Image

    from ckaad_fast.data.highres import PLATE_JITTER, make_highres_dataset

    def images(root, sub):
        return [np.asarray(Image.open(p), dtype=np.float64) for p in sorted((root / "plate" / sub).glob("*.png"))]

    a = make_highres_dataset(tmp_path / "a", "plate", image_size=256, n_train=2, n_test_good=1, n_test_defect=1)
    b = make_highres_dataset(tmp_path / "b", "plate", image_size=256, n_train=2, n_test_good=1, n_test_defect=1,
                             n_calib=3)
    for sub in ("train/good", "test/good", "test/spot", "ground_truth/spot"):
        assert len(images(a, sub)) == len(images(b, sub)) > 0
        for x, y in zip(images(a, sub), images(b, sub)):
            np.testing.assert_array_equal(x, y)
    calib = images(b, "calib/good")
    assert len(calib) == 3 and not (a / "plate" / "calib").exists()
    # Aligned: the holes (the darkest pixels, about 15 px across at 256²) sit in the same places in
    # every image, up to the fixture's jitter; a texture's dark pixels would not.
    train = images(a, "train/good")
    holes = [im[..., 0] < 60 for im in train + calib]
    overlap = [(h & holes[0]).sum() / holes[0].sum() for h in holes[1:]]
    assert min(overlap) > 0.4
    assert not np.array_equal(train[0], train[1])  # the grain and the place differ
    # ... by at most the jitter: every hole pixel of one plate lies within PLATE_JITTER * 2 + 1
    # pixels of a hole pixel of the other.
    from scipy import ndimage

    near = ndimage.binary_dilation(holes[0], iterations=2 * PLATE_JITTER + 1)
    assert all((h & ~near).sum() == 0 for h in holes[1:])
