"""Image files as pixel arrays, numpy and Pillow only: the one decoding and resizing rule every
path shares (PIL's bilinear filter; 16-bit and float images scaled to [0, 1] without clipping to
8 bits first; files far below the model's input refused), so that the same file gives the same
input in training, in the Scorer and in the deployment client that runs without PyTorch
(:mod:`ckaad_fast.deployment`). :mod:`ckaad_fast.data.images` turns them into tensors."""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Union

import numpy as np
from PIL import Image

__all__ = ["PathLike", "SizeLike", "HIGH_DEPTH_MODES", "MAX_UPSCALE", "ImageRejected", "minimum_source_size",
           "check_source_size", "check_finite", "size_hw", "norm_stats", "to_rgb_float01", "decode_pixels"]

PathLike = Union[str, os.PathLike]
SizeLike = Union[int, Sequence[int]]

#: PIL modes of 16-bit and float images (common for medical scans), read without clipping to 8 bits.
HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


#: The most an image may be enlarged to reach the model's input size, per side. A 1x1 or 8x8 file
#: stretched to 256x256 holds no detail at the scale the features see, yet it gets a score (in
#: one run, 1x1 PNGs in a calibration set pushed the threshold above every defect); so an image
#: smaller than 1/8 of the input on either side is refused, naming the minimum.
MAX_UPSCALE = 8


class ImageRejected(ValueError):
    """An image file that reads but cannot be scored meaningfully: far smaller than the model's
    input, or holding non-finite pixel values. Data sets leave it out with a warning; the scorer
    reports it in its row."""


def minimum_source_size(image_size: SizeLike) -> tuple[int, int]:
    """The smallest (height, width) of a file a model of input ``image_size`` accepts: 1/
    :data:`MAX_UPSCALE` of each side, rounded up."""
    h, w = size_hw(image_size)
    return -(-h // MAX_UPSCALE), -(-w // MAX_UPSCALE)


def check_source_size(size_wh: tuple[int, int], image_size: SizeLike) -> None:
    """:class:`ImageRejected` when an image of PIL size ``size_wh`` (width, height) is too small
    for ``image_size`` (see :data:`MAX_UPSCALE`)."""
    w, h = size_wh
    min_h, min_w = minimum_source_size(image_size)
    if w < min_w or h < min_h:
        H, W = size_hw(image_size)
        raise ImageRejected(f"the image is {w}x{h} pixels, far below the model's input of {W}x{H}: at least "
                            f"{min_w}x{min_h} is needed (enlarging more than {MAX_UPSCALE}x invents the detail a "
                            "defect would show)")


def check_finite(arr: np.ndarray) -> None:
    """:class:`ImageRejected` when ``arr`` (a float image's pixels) holds a NaN or an infinity."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        # One NaN would make the whole image NaN through the scaling: refuse it, naming why.
        raise ImageRejected(f"the image holds {int((~np.isfinite(arr)).sum())} non-finite pixel values (NaN or Inf)")


def size_hw(image_size: SizeLike) -> tuple[int, int]:
    """(height, width) of an int or an (h, w) pair; ValueError for anything else."""
    if isinstance(image_size, (int, np.integer)):
        h = w = int(image_size)
    else:
        try:
            h, w = (int(v) for v in image_size)
        except (TypeError, ValueError):
            raise ValueError(f"image_size must be an int or (height, width), got {image_size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def norm_stats(mean, std) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """``(mean, std)`` as float triples, or ``(None, None)`` for no normalisation."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ValueError("give both mean and std, or neither (mean=None, std=None: no normalisation)")
    mean = tuple(float(m) for m in mean)
    std = tuple(float(s) for s in std)
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
    if any(s <= 0 for s in std):
        raise ValueError(f"std must be positive, got {std}")
    return mean, std


def to_rgb_float01(im: Image.Image, size_wh: tuple[int, int]) -> np.ndarray:
    """Resize (bilinear) and convert any PIL image to an (H, W, 3) float32 array in [0, 1].
    :class:`ImageRejected` for an image far below ``size_wh`` or with non-finite pixels."""
    check_source_size(im.size, (size_wh[1], size_wh[0]))
    mode = im.mode
    if mode in HIGH_DEPTH_MODES:
        # 16-bit / 32-bit grayscale (common for medical scans): scale to [0, 1] without clipping to
        # 8 bits first, which convert("RGB") would do.
        arr = np.asarray(im, dtype=np.float32)
        check_finite(arr)
        if mode == "F":
            peak = float(arr.max()) if arr.size else 1.0
            scale = 1.0 if peak <= 1.0 else peak
        else:
            scale = 65535.0 if (mode.startswith("I;16") or (arr.size and arr.max() > 255)) else 255.0
        arr = np.clip(arr / scale, 0.0, 1.0)
        f = Image.fromarray(np.ascontiguousarray(arr, dtype=np.float32))
        if f.size != size_wh:
            f = f.resize(size_wh, Image.BILINEAR)
        g = np.asarray(f, dtype=np.float32)
        return np.repeat(g[:, :, None], 3, axis=2)
    rgb = im.convert("RGB")
    if rgb.size != size_wh:
        rgb = rgb.resize(size_wh, Image.BILINEAR)
    return np.asarray(rgb, dtype=np.float32) / 255.0


def decode_pixels(path: PathLike, image_size: SizeLike | None) -> np.ndarray:
    """Read ``path`` resized to ``image_size`` as a (3, H, W) array, before normalisation: uint8
    for 8-bit images (an RGB file read as it is), float32 in [0, 1] for 16-bit and float ones.
    ``image_size=None`` keeps the file's own size. :class:`ImageRejected` for a file far below
    the size or with non-finite pixels."""
    with Image.open(path) as im:
        w, h = im.size if image_size is None else size_hw(image_size)[::-1]
        check_source_size(im.size, (h, w))
        if im.mode in HIGH_DEPTH_MODES:
            return np.ascontiguousarray(to_rgb_float01(im, (w, h)).transpose(2, 0, 1))
        # An RGB file is read as it is (convert would copy it whole: 432 MB at 144 megapixels).
        rgb = im if im.mode == "RGB" else im.convert("RGB")
        if rgb.size != (w, h):
            rgb = rgb.resize((w, h), Image.BILINEAR)
        arr = np.asarray(rgb, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))
