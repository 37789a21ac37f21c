"""A tiled model decides by its feature memory (#36): the checkpoint carries the memory, every
scoring path (Detector, Scorer, calibration) computes the same score, the paths that cannot
carry it say so, and the calibration keeps its promise on fresh normal images."""
import warnings

import numpy as np
import pytest
import torch

from ckaad_fast.calibration import calibrate
from ckaad_fast.data import FolderDataset, MVTecDataset
from ckaad_fast.data.highres import make_highres_dataset
from ckaad_fast.errors import ArgumentError
from ckaad_fast.evaluation import predict_dataset
from ckaad_fast.model import (MEMORY_KEY, Detector, ModelConfig, fingerprint, load_checkpoint, model_from_checkpoint,
                              save_checkpoint)
from ckaad_fast.scoring import Scorer
from ckaad_fast.training import TrainConfig


@pytest.fixture(scope="module")
def grass(tmp_path_factory):
    """96² grass: 4 training images, 200 calibration normals, 2 + 2 test images."""
    return make_highres_dataset(tmp_path_factory.mktemp("mem"), "grass", image_size=96, scale=1, n_train=4,
                                n_test_good=2, n_test_defect=2, defect_px=(6, 6), n_calib=200)


def _model(candidates=50, norm_cell=None) -> Detector:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights on purpose: the mechanics, not the accuracy
        return Detector(ModelConfig(backbone="efficientnet_lite0", layers=(1, 2), image_size=(64, 64), tile_size=32,
                                    tile_stride=24, memory_candidates=candidates, memory_norm_cell=norm_cell),
                        weights="none").eval()


def _set(root, split="train", label="good"):
    mean, std = _model().config.mean, _model().config.std
    if split == "calib":
        return FolderDataset(root / "grass", "good", split="calib", image_size=None, mean=mean, std=std)
    return MVTecDataset(root, "grass", split, None, mean, std)


@pytest.fixture(scope="module")
def fitted(grass):
    model = _model()
    model.fit_memory([item[0] for item in _set(grass)])
    return model


def test_the_score_is_the_memorys_distance_at_the_maps_highest_cells(fitted, grass):
    test = _set(grass, "test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    with torch.inference_mode():
        scores, maps = fitted.tiled(images)
    memory = fitted.memory
    # 4 images of 96² at scale 2, on Lite0 layer 2's grid (stride 8): 24 x 24 cells each.
    assert memory.vectors.shape == (4 * 24 * 24, 24 + 40) and memory.scale == 2.0
    for image, amap, score in zip(images, maps, scores):
        assert float(score) == memory.score(fitted.backbone, image, amap.numpy(), candidates=50, edge=2)
    # Not the top-k rule: the same maps' mean of top-100 values are other numbers.
    topk = maps.flatten(1).topk(100).values.mean(1)
    assert not torch.allclose(scores, topk)
    # A training image's cells are in the memory: at distance 0 wherever the map points.
    with torch.inference_mode():
        own, _ = fitted.tiled(_set(grass)[0][0][None])
    assert float(own) < 1e-2 * float(scores.min())


def test_the_checkpoint_carries_the_memory_and_the_fingerprint_covers_it(fitted, grass, tmp_path):
    save_checkpoint(tmp_path / "c.pt", fitted)
    ckpt = load_checkpoint(tmp_path / "c.pt")
    assert ckpt["config"]["memory_candidates"] == 50 and ckpt["model"][MEMORY_KEY].shape == fitted.memory.vectors.shape
    again = model_from_checkpoint(ckpt)
    assert fingerprint(again) == fingerprint(fitted)
    x = _set(grass, "test")[2][0][None]
    with torch.inference_mode():
        assert torch.equal(again.tiled(x)[0], fitted.tiled(x)[0])
    other = _model()
    other.load_state_dict(fitted.state_dict(), strict=False)
    other.fit_memory([_set(grass)[0][0]])  # another memory, the same weights: another model
    assert fingerprint(other) != fingerprint(fitted)
    # A configuration that decides by a memory, without one: refused on load, saying so.
    del ckpt["model"][MEMORY_KEY]
    with pytest.raises(ValueError, match="feature memory"):
        model_from_checkpoint(ckpt)
    with pytest.raises(ValueError, match="fit_memory"):
        _model().tiled(x)


def test_the_scorer_and_the_calibration_score_alike(fitted, grass, tmp_path):
    scorer = Scorer(fitted, device="cpu", dtype="float32", num_workers=0)
    assert scorer.engine == "torch"
    test = _set(grass, "test")
    for i in range(len(test)):
        x = test[i][0][None]
        with torch.inference_mode():
            want = fitted.tiled(x)[0]
        assert torch.equal(scorer(x)[0], want)
    # From the files (decoded and normalised by the scorer): the same scores up to float32 rounding.
    rows = list(scorer.score_paths(list(test.paths)))
    pred = predict_dataset(fitted, test, batch_size=4, progress=False)
    np.testing.assert_allclose([r.score for r in rows], pred.scores, rtol=1e-4)
    with pytest.raises(ArgumentError, match="topk"):
        Scorer(fitted, device="cpu", topk=10)
    with pytest.raises(ArgumentError, match="engine"):
        Scorer(fitted, device="cpu", engine="onnxruntime")
    with pytest.raises(ArgumentError, match="engine"):
        calibrate(fitted, _set(grass, "calib"), 0.1, device="cpu", engine="openvino")


def test_export_refuses_a_model_it_cannot_carry(fitted, tmp_path):
    from ckaad_fast.export import export

    save_checkpoint(tmp_path / "c.pt", fitted)
    with pytest.raises(ArgumentError, match="feature memory"):
        export(tmp_path / "c.pt", tmp_path / "e")
    assert not (tmp_path / "e").exists()


def test_the_calibration_keeps_its_promise_on_fresh_normal_images(fitted, grass):
    """Calibrated on 100 generated normal images at 10% (the default engine and precision), the
    memory decision flags about 10% of 100 fresh ones: one calibration of 100 and 100 fresh
    images gives a beta-binomial count around 100 (k + 1) / (n + 1) = 10.9, standard deviation
    4.4. The memory holds the 4 training images only, so fresh images are not at distance 0."""
    calib = _set(grass, "calib")
    assert len(calib) == 200
    first = torch.utils.data.Subset(calib, range(100))
    first.paths = calib.paths[:100]
    cal = calibrate(fitted, first, target_fpr=0.1, device="cpu")
    assert cal.engine in (None, "torch")
    fresh = torch.utils.data.Subset(calib, range(100, 200))
    scores = predict_dataset(fitted, fresh, batch_size=16, progress=False).scores
    flagged = int(sum(cal.is_anomalous(float(s)) for s in scores))
    assert 1 <= flagged <= 10.9 + 4 * 4.4, flagged


def test_the_candidates_come_from_the_map_normalised_by_the_training_images_maps(grass, tmp_path):
    from ckaad_fast.map_norm import fit_map_normalization

    model = _model(norm_cell=16)
    train = [item[0] for item in _set(grass)]
    model.fit_memory(train)
    test = _set(grass, "test")
    images = torch.stack([test[i][0] for i in range(len(test))])
    with pytest.raises(ValueError, match="fit_memory_normalization"):
        model.tiled(images[:1])
    model.train()
    model.fit_memory_normalization(train)
    assert model.training  # its mode is given back (the maps themselves were computed in eval mode)
    model.eval()
    with torch.inference_mode():
        train_maps = np.stack([model.tiled(x[None])[1][0].numpy() for x in train])
        scores, maps = model.tiled(images)
    norm = fit_map_normalization(train_maps, 16)
    raw = []
    for image, amap, score in zip(images, maps, scores):
        want = model.memory.score(model.backbone, image, norm.apply(amap.numpy()), candidates=50, edge=2)
        assert float(score) == pytest.approx(want, rel=1e-6)
        raw.append(model.memory.score(model.backbone, image, amap.numpy(), candidates=50, edge=2))
    assert not np.allclose(raw, scores.numpy())  # the normalisation moved the candidates
    save_checkpoint(tmp_path / "n.pt", model)
    again = model_from_checkpoint(tmp_path / "n.pt")
    with torch.inference_mode():
        assert torch.equal(again.tiled(images)[0], scores)


def test_training_configurations_choose_the_rule():
    assert TrainConfig(tile_size=64, image_size=64).model_config().memory_candidates == 500
    assert TrainConfig(tile_size=64, image_size=64).model_config().memory_norm_cell is None  # textures: raw map
    assert TrainConfig(tile_size=64, image_size=64, memory_norm_cell=16).model_config().memory_norm_cell == 16
    assert TrainConfig(tile_size=64, image_size=64, memory_norm_cell=0).model_config().memory_norm_cell is None
    assert TrainConfig(tile_size=64, image_size=64, memory_candidates=0,
                       memory_norm_cell=16).model_config().memory_norm_cell is None
    with pytest.raises(ValueError, match="memory_norm_cell"):
        ModelConfig(image_size=(64, 64), tile_size=64, memory_norm_cell=16)  # no memory
    assert TrainConfig(tile_size=64, image_size=64, memory_candidates=0).model_config().memory_candidates is None
    assert TrainConfig(image_size=64).model_config().memory_candidates is None  # no tiling: top-k
    with pytest.raises(ValueError, match="memory_candidates"):
        TrainConfig(memory_candidates=-1)
    with pytest.raises(ValueError, match="memory_candidates"):
        ModelConfig(image_size=(64, 64), memory_candidates=10)  # not tiled
    with pytest.raises(ValueError, match="memory_edge"):
        ModelConfig(image_size=(64, 64), tile_size=64, memory_candidates=10, memory_edge=-1)
