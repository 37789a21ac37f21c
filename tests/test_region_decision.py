"""The image decision on regions (ckaad_fast.calibration.region_decision) and its calibration promise."""
import numpy as np
import pytest
from scipy import ndimage

from ckaad_fast.errors import ArgumentError
from ckaad_fast.calibration.region_decision import RegionDecision, calibrate_region_decision, region_score


def _normal_maps(rng, n, size=64):
    """Smooth random fields, as blurred anomaly maps of normal images are."""
    return np.stack([ndimage.gaussian_filter(rng.standard_normal((size, size)), 2.0) for _ in range(n)]).astype(np.float32)


def test_region_score_is_the_largest_regions_excess_mass():
    m = np.zeros((20, 20), np.float32)
    m[2:4, 2:4] = 3.0            # 4 pixels, 2 above the threshold each: mass 8
    m[10:15, 10:12] = 1.5        # 10 pixels, 0.5 above: mass 5
    m[18, 18] = 9.0              # 1 pixel, 8 above: mass 8, and the highest peak
    assert region_score(m, 1.0) == pytest.approx(8.0)
    m[10:15, 10:12] = 2.0        # now 10 pixels, 1 above: mass 10 beats the peak
    assert region_score(m, 1.0) == pytest.approx(10.0)
    assert region_score(m, 10.0) == 0.0
    m[0, 0] = np.nan             # not finite: in no region
    assert region_score(m, 1.0) == pytest.approx(10.0)


def test_a_broad_defect_outscores_a_higher_single_pixel():
    m = np.zeros((32, 32), np.float32)
    m[5, 5] = 4.0
    m[20:26, 20:26] = 2.0
    assert region_score(m, 1.0) > region_score(np.where(np.arange(32)[:, None] < 16, m, 0), 1.0)


@pytest.mark.parametrize("target_fpr", [0.05, 0.1])
def test_calibration_keeps_its_promise_on_fresh_normal_maps(target_fpr):
    """Calibrated on 100 normal maps, the decision flags at most the promised share of fresh
    normal maps, plus its margin: over 40 calibrations of 100 maps each, each scored on 100 fresh
    maps, the flagged count stays within 4 standard deviations of what a rate of (k + 1) / (n + 1)
    gives (the module's bound; each calibration's rate varies, so a count of 100 fresh maps is
    beta-binomial: variance m p (1 - p) (n + 1 + m) / (n + 2))."""
    rng = np.random.default_rng(0)
    flagged = 0
    for _ in range(40):
        rule = calibrate_region_decision(_normal_maps(rng, 100), target_fpr, pixel_fpr=1e-3)
        assert 0 < rule.image_threshold  # the pixel rate leaves regions in some normal maps
        flagged += sum(rule.decide(m) for m in _normal_maps(rng, 100))
    n, m, runs = 100, 100, 40
    p = (int(target_fpr * n) + 1) / (n + 1)
    sd = (runs * m * p * (1 - p) * (n + 1 + m) / (n + 2)) ** 0.5
    assert flagged <= runs * m * p + 4 * sd, (flagged, runs * m * p + 4 * sd)
    # ... and it is not a rule that flags nothing: the rate seen is near its target.
    assert flagged >= target_fpr * runs * m * 0.5


def test_the_calibration_is_not_trivially_safe_a_defect_is_flagged():
    rng = np.random.default_rng(1)
    rule = calibrate_region_decision(_normal_maps(rng, 100), 0.05, pixel_fpr=1e-3)
    m = _normal_maps(rng, 1)[0]
    m[30:36, 30:36] += 3 * rule.pixel_threshold
    assert rule.decide(m)


def test_round_trip_and_bad_arguments():
    rng = np.random.default_rng(2)
    rule = calibrate_region_decision(_normal_maps(rng, 20), 0.1, pixel_fpr=1e-3)
    assert RegionDecision.from_dict(rule.to_dict()) == rule
    assert rule.num_normal == 20
    with pytest.raises(ArgumentError, match="normal_maps"):
        calibrate_region_decision([], 0.1)
    with pytest.raises(ArgumentError, match="normal_maps"):
        calibrate_region_decision(np.full((3, 8, 8), np.inf), 0.1)
    with pytest.raises(ArgumentError, match="target_fpr"):
        calibrate_region_decision(_normal_maps(rng, 3), 1.5)
    with pytest.raises(ArgumentError, match="pixel_fpr"):
        calibrate_region_decision(_normal_maps(rng, 3), 0.1, pixel_fpr=0)


def test_the_promise_holds_on_generated_normal_images_through_a_tiled_model(tmp_path):
    """The same promise end to end: 200 generated normal plates (96², the high-resolution set's
    aligned object), their stitched maps from a tiled model (random weights: the promise rests on
    normal images being exchangeable, not on the model), calibrated on 100 at 10%, judged on the
    100 others. One calibration of 100 and 100 fresh images: the count is beta-binomial around
    100 (k + 1) / (n + 1) = 10.9 with a standard deviation of 4.4."""
    import warnings

    import torch

    from ckaad_fast.data import FolderDataset
    from ckaad_fast.data.highres import make_highres_dataset
    from ckaad_fast.evaluation import predict_dataset
    from ckaad_fast.model import Detector, ModelConfig

    root = make_highres_dataset(tmp_path, "plate", image_size=96, n_train=0, n_test_good=0, n_test_defect=0,
                                n_calib=200)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = Detector(ModelConfig(backbone="resnet18", layers=(2, 3), image_size=(64, 64), tile_size=64,
                                     tile_stride=32), weights="none").eval()
    data = FolderDataset(root / "plate", "good", split="calib", image_size=None, mean=model.config.mean,
                         std=model.config.std)
    maps = predict_dataset(model, data, batch_size=16, progress=False).maps
    assert maps.shape == (200, 96, 96)
    rule = calibrate_region_decision(maps[:100], 0.1, pixel_fpr=1e-3)
    assert sum(rule.decide(m) for m in maps[:100]) <= 10  # on its own set: at most k = 10
    flagged = sum(rule.decide(m) for m in maps[100:])
    assert 1 <= flagged <= 10.9 + 4 * 4.4, flagged
