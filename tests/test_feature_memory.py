"""The feature memory (#36): exact nearest distances, the same features at fit and at score, a
foreign patch found only where the map points, its file, and its arguments named."""
import warnings

import numpy as np
import pytest
import torch

from ckaad_fast.errors import ArgumentError
from ckaad_fast.feature_memory import FeatureMemory, memory_features, nearest_distances
from ckaad_fast.models import build_backbone


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights on purpose: no download, still a CNN
        return build_backbone("efficientnet_lite0", weights="none", layers=(1, 2))


def _texture(seed: int, size: int = 96) -> torch.Tensor:
    """A normalised grain texture: the same statistics for every seed, different grains."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 1, size, size, generator=g)
    x = torch.nn.functional.avg_pool2d(x, 3, 1, 1)
    return ((x - 0.5) * 4).expand(1, 3, size, size)[0].contiguous()


def test_nearest_distances_are_exact_across_chunks():
    g = torch.Generator().manual_seed(1)
    memory = torch.randn(70_000, 6, generator=g) * 3 + 10  # three chunks, far from the origin
    queries = torch.cat([torch.randn(40, 6, generator=g) * 3 + 10, memory[[5, 40_000, 69_999]]])
    want = torch.cdist(queries.double(), memory.double()).min(1).values
    got = nearest_distances(queries, memory)
    # float32: |q|² + |m|² - 2 q.m loses about eps * |q|² (|q|² about 700) to rounding.
    tol = (1e-6 * 700 * 8) ** 0.5
    assert torch.allclose(got.double(), want, atol=tol, rtol=1e-5)
    assert (got[-3:] <= tol).all()  # the memory's own rows are at distance 0


def test_features_pool_every_layer_onto_the_deepest_grid(backbone):
    feats = memory_features(backbone, _texture(0, 96), scale=2.0)
    assert feats.shape == (sum(backbone.channels), 96 * 2 // 8, 96 * 2 // 8)
    assert memory_features(backbone, _texture(0, 96)).shape[-2:] == (12, 12)


def test_a_training_image_is_at_distance_zero_everywhere(backbone):
    # The features at score are the features at fit: same scale, pooling and grid.
    images = [_texture(s) for s in (1, 2)]
    memory = FeatureMemory.fit(backbone, images, scale=2.0)
    assert memory.vectors.shape == (2 * 24 * 24, sum(backbone.channels))
    fresh = memory.score(backbone, _texture(3), np.zeros((96, 96)), candidates=24 * 24)
    again = memory.score(backbone, images[1], np.zeros((96, 96)), candidates=24 * 24)
    assert again < 1e-2 * fresh


def test_a_foreign_patch_scores_high_only_where_the_map_points(backbone):
    memory = FeatureMemory.fit(backbone, [_texture(s) for s in range(10, 14)], scale=2.0)
    spot = np.zeros((96, 96), np.float32)
    spot[40:56, 40:56] = 1.0  # the map points at the patch's place
    elsewhere = np.zeros((96, 96), np.float32)
    elsewhere[4:20, 70:86] = 1.0
    normal = [memory.score(backbone, _texture(s), spot, candidates=16) for s in range(20, 26)]
    defective = _texture(26).clone()
    defective[:, 44:52, 44:52] = 3.0  # a bright 8 px square
    assert memory.score(backbone, defective, spot, candidates=16) > 1.5 * max(normal)
    # Only the candidates are looked up: pointed elsewhere, the map hides the patch.
    assert memory.score(backbone, defective, elsewhere, candidates=16) < 1.5 * max(normal)


def test_the_edge_cells_are_never_proposed(backbone):
    # Their features see the backbone's padding: on the #36 sets normal images' largest distances.
    memory = FeatureMemory.fit(backbone, [_texture(4, 64)])
    feats = torch.zeros(3, 10, 12)
    amap = torch.arange(40 * 48, dtype=torch.float32).reshape(40, 48).numpy()  # highest at the bottom edge
    rows_cols = [divmod(int(i), 12) for i in memory.candidates(feats, amap, 1000, edge=2)]
    assert len(rows_cols) == 6 * 8 and all(2 <= r < 8 and 2 <= c < 10 for r, c in rows_cols)
    assert divmod(int(memory.candidates(feats, amap, 1, edge=2)[0]), 12) == (7, 9)
    assert divmod(int(memory.candidates(feats, amap, 1, edge=0)[0]), 12) == (9, 11)


def test_the_memory_file_round_trips(backbone, tmp_path):
    memory = FeatureMemory.fit(backbone, [_texture(4, 64)], scale=1.5)
    memory.save(tmp_path / "memory.npz")
    back = FeatureMemory.load(tmp_path / "memory.npz")
    assert torch.equal(back.vectors, memory.vectors)
    assert (back.scale, back.backbone, back.layers) == (1.5, "efficientnet_lite0", (1, 2))
    m = np.random.default_rng(0).random((64, 64))
    assert back.score(backbone, _texture(5, 64), m) == memory.score(backbone, _texture(5, 64), m)


def test_bad_arguments_are_named(backbone):
    memory = FeatureMemory.fit(backbone, [_texture(4, 64)])
    with pytest.raises(ArgumentError, match="candidates"):
        memory.score(backbone, _texture(5, 64), np.zeros((64, 64)), candidates=0)
    with pytest.raises(ArgumentError, match="edge"):
        memory.score(backbone, _texture(5, 64), np.zeros((64, 64)), edge=4)  # a grid of 8 x 8 cells
    with pytest.raises(ArgumentError, match="amap"):
        memory.score(backbone, _texture(5, 64), np.zeros((2, 64, 64)))
    with pytest.raises(ArgumentError, match="image"):
        memory.score(backbone, torch.zeros(1, 64, 64), np.zeros((64, 64)))
    with pytest.raises(ArgumentError, match="images"):
        FeatureMemory.fit(backbone, [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        other = build_backbone("efficientnet_lite0", weights="none", layers=(1, 2, 3))
    with pytest.raises(ArgumentError, match="backbone: this memory holds efficientnet_lite0 layers \\(1, 2\\)"):
        memory.score(other, _texture(5, 64), np.zeros((64, 64)))
