"""Realistic anomaly-detection data with exact masks, made offline.

No public anomaly data set can be downloaded on the machines this library is built on, but
scikit-image ships real texture photographs inside its wheel (``skimage.data.brick()``,
``gravel()`` and ``grass()``, 512x512 grayscale). :func:`make_texture_dataset` cuts normal
images out of one of them (random crops and flips, tinted to three channels) and paints synthetic
defects on others, writing an MVTec-style data set whose masks are exact: every pixel a defect
changes is inside its mask, and nothing outside the mask is touched.

Defect types (:data:`DEFECT_TYPES`):

- ``scratch``: a thin bright or dark random smooth curve.
- ``stain``: a blurred colour blob of a few overlapping ellipses, alpha-blended.
- ``hole``: an irregular dark region, darkest in its centre.
- ``patch``: a region replaced by texture cut from elsewhere, rotated 90 degrees and enlarged
  (a misplaced, wrongly oriented piece).

The coarse anomaly set (the paper's "single defect type" setting) holds images of one defect
type only, without masks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from ..records import holds

__all__ = [
    "TEXTURES",
    "DEFECT_TYPES",
    "load_texture",
    "render_normal",
    "add_defect",
    "make_texture_dataset",
]

TEXTURES = ("brick", "gravel", "grass")
DEFECT_TYPES = ("scratch", "stain", "hole", "patch")
COARSE_DIR = "coarse_anomalies"

# A fixed colour per texture, so the normal images look like coloured material rather than
# grayscale photographs, and a colour defect is a real change of appearance.
_TINTS = {
    "brick": (1.00, 0.74, 0.60),
    "gravel": (0.98, 0.95, 0.88),
    "grass": (0.70, 1.00, 0.55),
}
_STAIN_COLOURS = (
    (70.0, 45.0, 25.0),  # brown
    (25.0, 25.0, 32.0),  # oil
    (160.0, 85.0, 30.0),  # rust
    (55.0, 85.0, 150.0),  # ink
)
_SEED_TAG = {"train": 1, "test_good": 2}  # defect streams use 10 + index, coarse ones 100 + index
_FORMAT_VERSION = 1


def load_texture(category: str) -> np.ndarray:
    """The scikit-image texture photograph for ``category`` as a float32 (512, 512) array in [0, 255]."""
    if category not in TEXTURES:
        raise ValueError(f"category must be one of {TEXTURES}, got {category!r}")
    try:
        import skimage.data
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "make_texture_dataset needs scikit-image (pip install scikit-image) for its texture photographs"
        ) from e
    img = np.asarray(getattr(skimage.data, category)())
    if img.ndim == 3:
        img = img[..., :3].mean(axis=2)
    return img.astype(np.float32)


def _hw(image_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        h, w = (int(v) for v in image_size)
    if h < 16 or w < 16:
        raise ValueError(f"image_size must be at least 16 pixels a side, got {image_size!r}")
    return h, w


def _resize_f(a: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D float array to (h, w)."""
    h, w = hw
    if a.shape == (h, w):
        return a.astype(np.float32, copy=True)
    return np.asarray(Image.fromarray(np.ascontiguousarray(a, dtype=np.float32)).resize((w, h), Image.BILINEAR))


def _crop_hw(hw: tuple[int, int], crop_size: int) -> tuple[int, int]:
    h, w = hw
    m = max(h, w)
    return max(8, round(crop_size * h / m)), max(8, round(crop_size * w / m))


def _tint(gray: np.ndarray, category: str) -> np.ndarray:
    return gray[:, :, None] * np.asarray(_TINTS[category], dtype=np.float32)


def render_normal(
    texture: np.ndarray,
    rng: np.random.Generator,
    image_size: int | Sequence[int] = 256,
    crop_size: int = 256,
    category: str = "brick",
) -> np.ndarray:
    """One normal image: a random crop (with random flips) of ``texture``, resized, tinted.

    Returns a float32 (H, W, 3) array in [0, 255].
    """
    hw = _hw(image_size)
    ch, cw = _crop_hw(hw, crop_size)
    th, tw = texture.shape
    if ch > th or cw > tw:
        raise ValueError(f"crop_size {crop_size} is larger than the texture ({th}x{tw})")
    y = int(rng.integers(0, th - ch + 1))
    x = int(rng.integers(0, tw - cw + 1))
    crop = texture[y : y + ch, x : x + cw]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    if rng.random() < 0.5:
        crop = crop[::-1, :]
    gray = _resize_f(np.ascontiguousarray(crop), hw) * float(rng.uniform(0.96, 1.04))
    return np.clip(_tint(gray, category), 0.0, 255.0).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Defects. Each takes a float (H, W, 3) image in [0, 255] and returns (new image, bool mask);
# pixels outside the mask are left exactly as they were.
# ------------------------------------------------------------------------------------------


def _grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return yy, xx


def _scratch(img, rng, **_):
    h, w = img.shape[:2]
    s = min(h, w)
    n = 48
    length = rng.uniform(0.3, 0.6) * s
    theta = rng.uniform(0, 2 * math.pi) + np.cumsum(rng.normal(0.0, 0.09, n))
    step = length / n
    pts = np.stack([np.cumsum(step * np.cos(theta)), np.cumsum(step * np.sin(theta))], axis=1)
    centre = np.array([rng.uniform(0.3, 0.7) * w, rng.uniform(0.3, 0.7) * h])
    pts = pts - pts.mean(axis=0) + centre
    width = max(1, round(s * rng.uniform(0.008, 0.018)))
    canvas = Image.new("L", (w, h), 0)
    ImageDraw.Draw(canvas).line([tuple(p) for p in pts.tolist()], fill=255, width=width, joint="curve")
    mask = np.asarray(canvas) > 0
    value = rng.uniform(215, 250) if rng.random() < 0.5 else rng.uniform(10, 40)
    out = img.copy()
    out[mask] = value + rng.normal(0.0, 4.0, size=(int(mask.sum()), 1)).astype(np.float32)
    return out, mask


def _ellipse(yy, xx, cy, cx, a, b, angle):
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xx - cx, yy - cy
    u = (dx * c + dy * s) / a
    v = (-dx * s + dy * c) / b
    return u * u + v * v <= 1.0


def _stain(img, rng, **_):
    h, w = img.shape[:2]
    s = min(h, w)
    yy, xx = _grid(h, w)
    r = max(2.5, rng.uniform(0.07, 0.13) * s)
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    mask = np.zeros((h, w), dtype=bool)
    for _i in range(int(rng.integers(2, 5))):
        oy, ox = rng.uniform(-0.5, 0.5, size=2) * r
        a, b = r * rng.uniform(0.55, 1.0), r * rng.uniform(0.4, 0.9)
        mask |= _ellipse(yy, xx, cy + oy, cx + ox, a, b, rng.uniform(0, math.pi))
    soft = ndimage.gaussian_filter(mask.astype(np.float32), sigma=max(0.8, 0.3 * r))
    alpha = np.where(mask, 0.35 + 0.5 * np.clip(soft / max(soft.max(), 1e-6), 0, 1), 0.0)[:, :, None]
    colour = np.asarray(_STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))], dtype=np.float32)
    colour = colour * rng.uniform(0.85, 1.15)
    out = np.where(mask[:, :, None], img * (1 - alpha) + colour * alpha, img).astype(np.float32)
    return out, mask


def _hole(img, rng, **_):
    h, w = img.shape[:2]
    s = min(h, w)
    yy, xx = _grid(h, w)
    r0 = max(2.5, rng.uniform(0.05, 0.10) * s)
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    ang = np.arctan2(yy - cy, xx - cx)
    dist = np.hypot(yy - cy, xx - cx)
    radius = np.full_like(ang, r0)
    for k in (2, 3, 5):  # a wobbly, irregular outline
        radius += r0 * rng.uniform(0.05, 0.18) * np.cos(k * ang + rng.uniform(0, 2 * math.pi))
    mask = dist <= radius
    depth = np.clip(dist / np.maximum(radius, 1e-6), 0, 1)
    factor = (rng.uniform(0.08, 0.2) + 0.3 * depth * depth)[:, :, None]
    out = np.where(mask[:, :, None], img * factor, img).astype(np.float32)
    return out, mask


def _patch(img, rng, texture=None, category="brick", crop_size=256, **_):
    h, w = img.shape[:2]
    s = min(h, w)
    if texture is None:
        raise ValueError("the 'patch' defect needs the source texture")
    r = max(3, round(rng.uniform(0.09, 0.15) * s))
    cy = int(rng.integers(r, h - r + 1))
    cx = int(rng.integers(r, w - r + 1))
    yy, xx = _grid(h, w)
    if rng.random() < 0.5:
        mask = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r)
    else:
        mask = _ellipse(yy, xx, cy, cx, r, r * rng.uniform(0.6, 1.0), rng.uniform(0, math.pi))
    # Texture pixels per image pixel, as in the normal images; the patch is enlarged 1.7-2.2x.
    scale = max(_crop_hw((h, w), crop_size)) / max(h, w)
    src = max(4, round(2 * r * scale / rng.uniform(1.7, 2.2)))
    th, tw = texture.shape
    sy = int(rng.integers(0, th - src + 1))
    sx = int(rng.integers(0, tw - src + 1))
    piece = np.rot90(texture[sy : sy + src, sx : sx + src], k=int(rng.choice([1, 3])))
    piece = _resize_f(np.ascontiguousarray(piece), (2 * r, 2 * r))
    canvas = np.zeros((h, w), dtype=np.float32)
    y0, x0 = cy - r, cx - r
    ys, xs = slice(max(y0, 0), min(y0 + 2 * r, h)), slice(max(x0, 0), min(x0 + 2 * r, w))
    canvas[ys, xs] = piece[ys.start - y0 : ys.stop - y0, xs.start - x0 : xs.stop - x0]
    pasted = np.clip(_tint(canvas, category), 0, 255)
    out = np.where(mask[:, :, None], pasted, img).astype(np.float32)
    return out, mask


_DEFECTS = {"scratch": _scratch, "stain": _stain, "hole": _hole, "patch": _patch}


def add_defect(
    image: np.ndarray,
    kind: str,
    rng: np.random.Generator,
    texture: np.ndarray | None = None,
    category: str = "brick",
    crop_size: int = 256,
) -> tuple[np.ndarray, np.ndarray]:
    """Paint one defect of type ``kind`` on a float (H, W, 3) image in [0, 255].

    Returns ``(image, mask)``: the new float32 image and a boolean (H, W) mask that covers every
    changed pixel (pixels outside it are bit-identical to the input). ``texture`` is needed by
    ``patch``. Retries (with the same generator) until the mask is non-empty.
    """
    if kind not in _DEFECTS:
        raise ValueError(f"defect type must be one of {DEFECT_TYPES}, got {kind!r}")
    for _ in range(10):
        out, mask = _DEFECTS[kind](image, rng, texture=texture, category=category, crop_size=crop_size)
        if mask.any():
            return out, mask
    raise RuntimeError(f"could not place a {kind!r} defect on a {image.shape[:2]} image")  # pragma: no cover


def _save_png(arr: np.ndarray, path: str) -> None:
    Image.fromarray(arr).save(path, format="PNG", compress_level=3)


def _to_u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def make_texture_dataset(
    out_dir: str | os.PathLike,
    category: str = "brick",
    n_train: int = 30,
    n_test_good: int = 10,
    n_test_defect: int = 5,
    n_coarse: int = 10,
    image_size: int | Sequence[int] = 256,
    seed: int = 0,
    *,
    defect_types: Sequence[str] = DEFECT_TYPES,
    coarse_defect: str | None = None,
    crop_size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Write an MVTec-layout anomaly data set made from a scikit-image texture photograph.

    Layout written under ``out_dir`` (the returned root)::

        <category>/train/good/000.png ...              n_train normal images
        <category>/test/good/000.png ...               n_test_good normal images
        <category>/test/<defect>/000.png ...           n_test_defect images per defect type
        <category>/ground_truth/<defect>/000_mask.png  their exact masks (0 / 255)
        <category>/coarse_anomalies/<coarse_defect>_000.png ...  n_coarse anomalies of ONE type
        <category>/meta.json                           the parameters used

    so ``MVTecDataset(root, category, ...)`` reads it and ``AnomalyFolderDataset(
    root/category/coarse_anomalies)`` is the coarse anomaly set (image-level labels only).
    ``coarse_defect`` defaults to the first of ``defect_types``; it is one of the test defect types
    (the coarse knowledge is incomplete: it covers one type of several).

    Normal images are random ``crop_size`` crops (and flips) of the 512x512 photograph resized to
    ``image_size`` (an int or (height, width)). Everything is drawn from ``seed`` (a separate
    stream per split and defect type, so changing one count leaves the other splits unchanged):
    the same arguments give byte-identical files.

    The category folder is written to a temporary folder next to it and renamed into place, so
    it is either complete or absent. If it already exists with the same parameters it is reused;
    with other parameters a FileExistsError is raised unless ``overwrite=True``.
    """
    meta = _texture_meta(category, n_train, n_test_good, n_test_defect, n_coarse, image_size, seed, defect_types,
                         coarse_defect, crop_size)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / category
    if final.exists() and not overwrite:
        if _made_with(final, meta):
            return root
        raise FileExistsError(
            f"{final} exists and was not made by make_texture_dataset with these parameters; "
            "pass overwrite=True to replace it"
        )
    tmp = Path(tempfile.mkdtemp(prefix=f".{category}.tmp-", dir=root))
    try:
        _write_texture_tree(tmp, meta)
        _publish(tmp, final, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root


def _texture_meta(category, n_train, n_test_good, n_test_defect, n_coarse, image_size, seed, defect_types,
                  coarse_defect, crop_size) -> dict:
    """The checked parameters of :func:`make_texture_dataset`, as written to meta.json."""
    if category not in TEXTURES:
        raise ValueError(f"category must be one of {TEXTURES}, got {category!r}")
    defect_types = [defect_types] if isinstance(defect_types, str) else list(defect_types)
    bad = [d for d in defect_types if d not in DEFECT_TYPES]
    if bad or not defect_types or len(set(defect_types)) != len(defect_types):
        raise ValueError(f"defect_types must be distinct names from {DEFECT_TYPES}, got {defect_types}")
    coarse_defect = defect_types[0] if coarse_defect is None else coarse_defect
    if coarse_defect not in DEFECT_TYPES:
        raise ValueError(f"coarse_defect must be one of {DEFECT_TYPES}, got {coarse_defect!r}")
    counts = {"n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect, "n_coarse": n_coarse}
    for k, v in counts.items():
        if int(v) < 0:
            raise ValueError(f"{k} must be >= 0, got {v}")
    if n_train < 1:
        raise ValueError("n_train must be at least 1")
    hw = _hw(image_size)
    if not 8 <= crop_size <= 512:
        raise ValueError(f"crop_size must be in [8, 512], got {crop_size}")
    return {
        "generator": "ckaad_fast.data.synthetic.make_texture_dataset",
        "format_version": _FORMAT_VERSION,
        "category": category,
        **{k: int(v) for k, v in counts.items()},
        "image_size": list(hw),
        "seed": int(seed),
        "defect_types": defect_types,
        "coarse_defect": coarse_defect,
        "crop_size": int(crop_size),
    }


def _made_with(existing: Path, meta: dict) -> bool:
    return holds(existing / "meta.json", meta)


def _write_texture_tree(tmp: Path, meta: dict) -> None:
    """Render every image and mask of the data set described by ``meta`` into ``tmp``."""
    category, crop_size, hw = meta["category"], meta["crop_size"], tuple(meta["image_size"])
    texture = load_texture(category)
    cat_id = TEXTURES.index(category)

    def stream(tag: int) -> np.random.Generator:
        return np.random.default_rng([meta["seed"], cat_id, tag])

    def normal(rng) -> np.ndarray:
        return render_normal(texture, rng, hw, crop_size, category)

    for split, tag, n in (("train", "train", meta["n_train"]), ("test", "test_good", meta["n_test_good"])):
        d = tmp / split / "good"
        d.mkdir(parents=True)
        rng = stream(_SEED_TAG[tag])
        for i in range(n):
            _save_png(_to_u8(normal(rng)), str(d / f"{i:03d}.png"))
    for kind in meta["defect_types"]:
        d_img = tmp / "test" / kind
        d_gt = tmp / "ground_truth" / kind
        d_img.mkdir(parents=True)
        d_gt.mkdir(parents=True)
        rng = stream(10 + DEFECT_TYPES.index(kind))
        for i in range(meta["n_test_defect"]):
            img, mask = add_defect(normal(rng), kind, rng, texture, category, crop_size)
            _save_png(_to_u8(img), str(d_img / f"{i:03d}.png"))
            _save_png(mask.astype(np.uint8) * 255, str(d_gt / f"{i:03d}_mask.png"))
    d_coarse = tmp / COARSE_DIR
    d_coarse.mkdir()
    coarse = meta["coarse_defect"]
    rng = stream(100 + DEFECT_TYPES.index(coarse))
    for i in range(meta["n_coarse"]):
        img, _mask = add_defect(normal(rng), coarse, rng, texture, category, crop_size)
        _save_png(_to_u8(img), str(d_coarse / f"{coarse}_{i:03d}.png"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _publish(tmp: Path, final: Path, meta: dict) -> None:
    """Rename the finished ``tmp`` onto ``final``: the folder is complete or absent, never half made."""
    if final.exists():  # overwrite=True
        trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.rename(final, trash / final.name)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.rename(tmp, final)
    except OSError:
        # Someone else finished the same folder first; keep theirs if it is identical.
        if final.exists() and _made_with(final, meta):
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise
