"""The per-position normalisation of anomaly maps (ckaad_fast.map_norm)."""
import json

import numpy as np
import pytest

from ckaad_fast.errors import ArgumentError
from ckaad_fast.map_norm import MIN_SPREAD_SHARE, MapNormalization, fit_map_normalization


def _normal_maps(rng, n, h=96, w=128):
    """Maps whose normal level and spread depend on the place: a busy band (rows 32-63) sits
    higher and varies four times as much as the quiet rest, as an object's edges do."""
    level = np.full((h, w), 1.0)
    spread = np.full((h, w), 0.05)
    level[32:64] = 3.0
    spread[32:64] = 0.2
    return (level + spread * rng.standard_normal((n, h, w))).astype(np.float32), level, spread


def test_fresh_normal_maps_come_out_standardised_in_every_cell():
    rng = np.random.default_rng(0)
    fit, _, _ = _normal_maps(rng, 40)
    norm = fit_map_normalization(fit, cell=8)
    z = norm.apply(_normal_maps(rng, 40)[0]).astype(np.float64)
    # Away from the band's two edges (where a cell's bilinear neighbours differ), every cell of
    # fresh maps has mean ~0 and spread ~1. Over 40 maps x 64 pixels a cell's mean has a standard
    # error of 1/sqrt(2560) ~ 0.02, the fitted mean and spread errors of the same order.
    rows = np.r_[0:24, 40:56, 72:96]
    cells = z[:, rows].reshape(40, len(rows) // 8, 8, 16, 8).transpose(1, 3, 0, 2, 4).reshape(len(rows) // 8, 16, -1)
    assert np.abs(cells.mean(-1)).max() < 0.12
    assert np.abs(cells.std(-1) - 1).max() < 0.12


def test_a_defect_on_a_quiet_place_outranks_the_busy_places_normal_values_only_after_normalisation():
    rng = np.random.default_rng(1)
    fit, level, _ = _normal_maps(rng, 30)
    norm = fit_map_normalization(fit, cell=8)
    m = _normal_maps(rng, 1)[0][0]
    m[10:13, 10:13] = 1.6  # twelve quiet spreads above its place's level, far below the band
    assert m.max() > 2.5 and m[10:13, 10:13].max() < m[32:64].max()  # raw: the busy band is the peak
    z = norm.apply(m)
    assert np.unravel_index(np.argmax(z), z.shape) in {(y, x) for y in range(10, 13) for x in range(10, 13)}


def test_a_flat_cell_gets_the_floor_spread_and_nothing_divides_by_zero():
    maps = np.random.default_rng(2).normal(0, 1, (5, 32, 32)).astype(np.float32)
    maps[:, :8, :8] = 7.0  # every normal map flat there
    norm = fit_map_normalization(maps, cell=8)
    assert norm.spread[0, 0] == pytest.approx(MIN_SPREAD_SHARE * np.median(norm.spread), rel=1e-6)
    assert np.isfinite(norm.apply(maps)).all()


def test_one_pixel_cells_give_the_per_pixel_statistics_exactly_at_the_fitted_size():
    rng = np.random.default_rng(3)
    maps = rng.normal(0, 1, (6, 5, 7)) * np.arange(1, 36).reshape(5, 7)
    norm = fit_map_normalization(maps, cell=1)
    np.testing.assert_allclose(norm.mean, maps.mean(0), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(norm.spread, maps.std(0, ddof=1), rtol=1e-6)
    np.testing.assert_allclose(norm.apply(maps[0]), (maps[0] - maps.mean(0)) / maps.std(0, ddof=1), rtol=1e-4, atol=1e-4)


def test_another_size_takes_the_same_relative_places_and_short_cells_count_their_own_pixels():
    maps = np.zeros((3, 20, 20))
    maps[:, :, 10:] = 4.0
    maps += np.random.default_rng(4).normal(0, 1, maps.shape)
    norm = fit_map_normalization(maps, cell=6)  # 20 = 6 + 6 + 6 + 2: the last cells are 2 wide
    assert norm.mean.shape == (4, 4)
    np.testing.assert_allclose(norm.mean[:, 3], [maps[:, r * 6:r * 6 + 6, 18:].mean() for r in range(4)], rtol=1e-6)
    big = norm.apply(np.full((40, 40), 2.0, np.float32))  # twice the size: left half low, right high
    assert big[:, :8].mean() > 0 > big[:, -8:].mean()


def test_round_trip_through_json_is_exact():
    norm = fit_map_normalization(np.random.default_rng(5).normal(0, 1, (4, 24, 16)).astype(np.float32), cell=8)
    back = MapNormalization.from_dict(json.loads(json.dumps(norm.to_dict())))
    assert (back.cell, back.shape, back.count) == (8, (24, 16), 4)
    np.testing.assert_array_equal(back.mean, norm.mean)
    np.testing.assert_array_equal(back.spread, norm.spread)
    m = np.random.default_rng(6).normal(0, 1, (24, 16)).astype(np.float32)
    np.testing.assert_array_equal(back.apply(m), norm.apply(m))


@pytest.mark.parametrize("maps,cell,name", [
    (np.zeros((1, 8, 8)), 4, "maps"),
    (np.zeros((8, 8)), 4, "maps"),
    (np.full((3, 8, 8), np.nan), 4, "maps"),
    (np.zeros((3, 8, 8)), 0, "cell"),
    (np.zeros((3, 8, 8)), 2.5, "cell"),
])
def test_bad_arguments_are_named(maps, cell, name):
    with pytest.raises(ArgumentError, match=name):
        fit_map_normalization(maps, cell=cell)


def test_from_dict_refuses_a_zero_spread():
    d = fit_map_normalization(np.random.default_rng(7).normal(0, 1, (3, 8, 8)), cell=4).to_dict()
    d["spread"][0][0] = 0.0
    with pytest.raises(ValueError, match="spreads > 0"):
        MapNormalization.from_dict(d)
