"""A synthetic high-resolution anomaly data set: large texture images with defects a few pixels
wide and exact masks, the case tiling is for (:mod:`ckaad_fast.tiling`).

Normal images are mirror-tiled copies of one of scikit-image's texture photographs (mirroring
keeps the texture continuous across copies), enlarged ``scale`` times, cut at a random offset,
flipped at random and tinted: ``image_size`` pixels square (2048 by default). A defect is a
soft-edged dark or light spot whose diameter is drawn from ``defect_px`` (4 to 10 pixels by
default), at a random place; its mask is the spot's core (where it has more than half its
strength), so the mask is exact. Resized whole to a model's 256² input, such a defect shrinks
to about one pixel; a tile keeps it as it is.

One aligned object as well, ``plate`` (:data:`HIGHRES_OBJECTS`): a machined plate seen from
above, the same part in the same place in every image (shifted by at most
:data:`PLATE_JITTER` pixels, as a fixture holds it): a 4 x 4 grid of dark holes with bright
chamfers, two grooves and a large ring, over a faint grain taken from the gravel photograph. Its
normal maps differ from place to place (edges answer more than flat metal), which is what a
per-position normalisation of the maps is for (:mod:`ckaad_fast.map_norm`).

The tree is MVTec's (``root/<category>/train/good``, ``test/good``, ``test/spot``,
``ground_truth/spot``), plus ``calib/good`` when ``n_calib`` > 0: normal images kept apart from
training and testing, for the statistics of normal maps and a calibration. It is written once and
reused while its parameters are the same.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from .synthetic import TEXTURES, load_texture
from .images import size_hw
from ..records import holds

__all__ = ["make_highres_dataset", "render_highres_normal", "render_plate", "add_small_defect", "HIGHRES_DEFECT",
           "HIGHRES_OBJECTS", "HIGHRES_CATEGORIES", "PLATE_JITTER"]

#: The defect type (test sub-folder) of the high-resolution set.
HIGHRES_DEFECT = "spot"
#: Aligned objects of the high-resolution set (the textures are :data:`.synthetic.TEXTURES`).
HIGHRES_OBJECTS = ("plate",)
HIGHRES_CATEGORIES = TEXTURES + HIGHRES_OBJECTS
#: How far (pixels, each axis) a plate may sit from its place.
PLATE_JITTER = 3
_TINTS = {"brick": (1.0, 0.82, 0.7), "gravel": (0.95, 0.93, 0.9), "grass": (0.78, 1.0, 0.72)}


def render_highres_normal(texture: np.ndarray, rng: np.random.Generator, size: int, scale: int,
                          category: str) -> np.ndarray:
    """One normal (size, size, 3) float32 image in [0, 255]: the photograph mirror-tiled,
    enlarged ``scale`` times (nearest-free: bilinear), cut at a random offset, flipped, tinted."""
    from PIL import Image

    need = -(-size // scale) + 2
    reps = -(-need // texture.shape[0]) + 1
    big = np.pad(texture, ((0, texture.shape[0] * reps), (0, texture.shape[1] * reps)), mode="symmetric")
    y, x = (int(v) for v in rng.integers(0, texture.shape[0], 2))
    crop = np.ascontiguousarray(big[y:y + need, x:x + need])
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1]
    img = Image.fromarray(np.ascontiguousarray(crop, dtype=np.float32)).resize((need * scale, need * scale), Image.BILINEAR)
    gray = np.asarray(img, dtype=np.float32)[:size, :size] * float(rng.uniform(0.96, 1.04))
    return np.clip(gray[:, :, None] * np.asarray(_TINTS[category], np.float32), 0, 255).astype(np.float32)


def render_plate(grain: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """One normal plate, (size, size, 3) float32 in [0, 255]: the part drawn in coordinates
    relative to the image's side (so any ``size`` shows the same part), shifted by up to
    :data:`PLATE_JITTER` pixels, with a faint grain (``grain``: a texture photograph scaled to a
    spread of 6 grey levels) cut at a random place, and a brightness within ±4%."""
    s = float(size)
    dy, dx = (float(v) for v in rng.uniform(-PLATE_JITTER, PLATE_JITTER, 2))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    yy -= dy
    xx -= dx

    def inside(dist):  # 1 inside a shape (signed distance < 0), 0 outside, one pixel of soft edge
        return np.clip(0.5 - dist, 0.0, 1.0)

    img = np.full((size, size), 150.0, np.float32)
    # Two horizontal grooves, dark with a bright lower lip.
    for cy in (0.08 * s, 0.92 * s):
        groove = inside(np.abs(yy - cy) - 0.006 * s)
        lip = inside(np.abs(yy - cy - 0.009 * s) - 0.002 * s)
        img += -70.0 * groove + 50.0 * lip
    # A large ring around the centre.
    r = np.hypot(yy - s / 2, xx - s / 2)
    img += 45.0 * inside(np.abs(r - 0.3 * s) - 0.004 * s)
    # A 4 x 4 grid of holes: a bright chamfer, a dark bore.
    for cy in np.linspace(0.2, 0.8, 4) * s:
        for cx in np.linspace(0.2, 0.8, 4) * s:
            d = np.hypot(yy - cy, xx - cx)
            img += 60.0 * inside(np.abs(d - 0.035 * s) - 0.005 * s) - 110.0 * inside(d - 0.03 * s)
    g = grain.shape[0]
    reps = -(-size // g) + 1
    big = np.pad(grain, ((0, g * reps), (0, g * reps)), mode="symmetric")
    y, x = (int(v) for v in rng.integers(0, g, 2))
    cut = big[y:y + size, x:x + size]
    img += (cut - cut.mean()) * (6.0 / max(float(cut.std()), 1e-6))
    img *= float(rng.uniform(0.96, 1.04))
    return np.clip(np.repeat(img[:, :, None], 3, axis=2), 0, 255).astype(np.float32)


def add_small_defect(img: np.ndarray, rng: np.random.Generator, defect_px=(4, 10)) -> tuple[np.ndarray, np.ndarray]:
    """(image with one spot, its bool mask): a spot of diameter in ``defect_px``, 60 to 90 grey
    levels darker or lighter at its core, soft at its edge; the mask is where it is over half
    strength. Pixels outside the spot's reach are left exactly as they were."""
    h, w = img.shape[:2]
    d = float(rng.uniform(*defect_px))
    r = d / 2
    cy, cx = (float(rng.uniform(16, n - 16)) for n in (h, w))
    y0, y1, x0, x1 = int(cy - r - 3), int(cy + r + 4), int(cx - r - 3), int(cx + r + 4)
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dist = np.hypot(yy - cy, xx - cx)
    strength = np.clip((r + 1.0 - dist) / 2.0, 0.0, 1.0)  # 1 inside r - 1, 0 beyond r + 1
    sign = 1.0 if rng.random() < 0.5 else -1.0
    delta = sign * float(rng.uniform(60, 90)) * strength
    out = img.copy()
    out[y0:y1, x0:x1] = np.clip(out[y0:y1, x0:x1] + delta[:, :, None], 0, 255)
    mask = np.zeros((h, w), bool)
    mask[y0:y1, x0:x1] = strength > 0.5
    return out, mask


def make_highres_dataset(root, category: str = "grass", image_size: int = 2048, scale: int = 2, n_train: int = 6,
                         n_test_good: int = 8, n_test_defect: int = 8, defect_px=(4, 10), seed: int = 0,
                         n_calib: int = 0) -> Path:
    """Write (or reuse) the high-resolution set under ``root/<category>`` and return ``root``;
    open it with ``MVTecDataset(root, category, ...)`` or ``--layout mvtec``, and its ``n_calib``
    calibration normals with ``FolderDataset(root / category, "good", split="calib", ...)``.
    ``scale`` enlarges a texture's photograph; a plate is drawn at ``image_size`` directly."""
    from PIL import Image

    if category not in HIGHRES_CATEGORIES:
        raise ValueError(f"category must be one of {HIGHRES_CATEGORIES}, got {category!r}")
    size = size_hw(image_size)[0]
    lo, hi = (float(v) for v in defect_px)
    if not 1 <= lo <= hi:
        raise ValueError(f"defect_px must be (low, high) with 1 <= low <= high, got {defect_px!r}")
    meta = {"kind": "highres", "category": category, "image_size": size, "scale": int(scale), "n_train": n_train,
            "n_test_good": n_test_good, "n_test_defect": n_test_defect, "defect_px": [lo, hi], "seed": seed}
    if n_calib:
        meta["n_calib"] = int(n_calib)
    root = Path(root)
    final = root / category
    if holds(final / "meta.json", meta):
        return root
    tmp = root / f".{category}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    texture = load_texture("gravel" if category == "plate" else category)
    rng = np.random.default_rng([seed, HIGHRES_CATEGORIES.index(category), 7])

    def normal(stream):
        if category == "plate":
            return render_plate(texture, stream, size)
        return render_highres_normal(texture, stream, size, scale, category)

    def save(arr, path):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(path)

    for i in range(n_train):
        save(normal(rng).round().astype(np.uint8), tmp / "train/good" / f"{i:03d}.png")
    for i in range(n_test_good):
        save(normal(rng).round().astype(np.uint8), tmp / "test/good" / f"{i:03d}.png")
    for i in range(n_test_defect):
        img, mask = add_small_defect(normal(rng), rng, (lo, hi))
        save(img.round().astype(np.uint8), tmp / "test" / HIGHRES_DEFECT / f"{i:03d}.png")
        save(mask.astype(np.uint8) * 255, tmp / "ground_truth" / HIGHRES_DEFECT / f"{i:03d}_mask.png")
    # Drawn last, from a stream of their own, so that adding them leaves the other images as they were.
    calib_rng = np.random.default_rng([seed, HIGHRES_CATEGORIES.index(category), 11])
    for i in range(n_calib):
        save(normal(calib_rng).round().astype(np.uint8), tmp / "calib/good" / f"{i:03d}.png")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return root
